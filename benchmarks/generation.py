"""Generation speed of decoder artifacts side by side, interleaved in one run: ours (`compress run` out folders),
ONNX Runtime GenAI Model Builder's (`python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`),
which take the same inputs (input_ids, attention_mask, past_key_values.N.*), and llama.cpp on a GGUF file
(benchmarks/llama_cpp_generation.py, the `bench` extra). Each measurement is a fresh child process (seeded
random prompt, greedy, first run discarded, median of the rest: compressor.generation_benchmark for ONNX
folders); the models take turns for --rounds rounds and the medians over rounds are reported.

    python benchmarks/generation.py ours-int4=runs/smol-int4 mb-int4=mb/int4 llama.cpp=model.gguf [--threads 2]
        [--prompt-tokens 128] [--new-tokens 128] [--runs 3] [--rounds 2] [--name generation]

Writes benchmarks/results/NAME.json and NAME.md.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.validate import BenchmarkSettings, run_generation_benchmark  # noqa: E402

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
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    settings = BenchmarkSettings(threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                 generation_runs=args.runs)
    measured = {label: [] for label in models}
    for round_index in range(args.rounds):
        for label, folder in models.items():
            result = _measure(folder, args.provider, settings)
            measured[label].append(result)
            print(f"round {round_index + 1} {label}: prefill {result['prefill_ms']:.1f} ms, decode "
                  f"{result['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    rows = []
    for label, runs in measured.items():
        report = Path(models[label]) / "report.json"
        metric = json.loads(report.read_text())["accuracy"]["onnxruntime"].get(args.provider) \
            if report.is_file() else None
        rows.append({"model": label, "folder": models[label], "bytes": _size(Path(models[label])),
                     "prompt_tokens": runs[0]["prompt_tokens"], "new_tokens": runs[0]["new_tokens"],
                     **{key: statistics.median(r[key] for r in runs)
                        for key in ("prefill_ms", "decode_tokens_per_s", "peak_rss_mb")},
                     "heldout_perplexity_ours": metric})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    lines = [f"# Generation ({args.provider}, {args.threads} threads, {rows[0]['prompt_tokens']}-token prompt, "
             f"{rows[0]['new_tokens']} new tokens, greedy; medians of {args.rounds} interleaved rounds x "
             f"{args.runs} runs)", "", "| model | MB on disk | prefill ms | decode tok/s | peak RSS MiB | "
             "perplexity (our report, held-out) |", "|---|---|---|---|---|---|"]
    for row in rows:
        ppl = f"{row['heldout_perplexity_ours']:.2f}" if row["heldout_perplexity_ours"] else "-"
        lines.append(f"| {row['model']} | {row['bytes'] / 1e6:.1f} | {row['prefill_ms']:.1f} | "
                     f"{row['decode_tokens_per_s']:.1f} | {row['peak_rss_mb']:.0f} | {ppl} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

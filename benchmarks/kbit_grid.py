"""k-bit grid on the GPT samples: held-out perplexity measured through ONNX Runtime on each exported artifact,
against total model bits, for every data type x bits x block size; plus ONNX Runtime's own MatMulNBitsQuantizer
(RTN, block 32 and 128, accuracy level 4) on our fp32 export, and CPU latency of the headline artifacts.

    python benchmarks/kbit_grid.py [--models gpt-xs,gpt-s,gpt-m,gpt-l] [--windows 300] [--latency-models gpt-l]
                                   [--dtypes int,nf] [--bits 3,4] [--blocks 64,0]

Every grid point, the fp32 baseline included, goes through `compress run`'s pipeline (compressor.pipeline.run:
the fp32 recipe plus `--set quantize.*` overrides), each into its own folder; the numbers are read from its
report.json. Writes benchmarks/results/kbit_grid.json, kbit_grid.md and kbit_grid.png (or under --out).
Perplexity is per byte on the first --windows held-out windows of 128 bytes (the same windows for every row of a
model).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.ort_runtime import create_session, logits_fn  # noqa: E402
from compressor.pipeline import RunOptions, run  # noqa: E402
from compressor.recipes import resolve_recipe  # noqa: E402
from compressor.tasks import TASKS  # noqa: E402
from compressor.validate import BenchmarkSettings, run_benchmark  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# (row name, quantize overrides): "int" is the paper's absmax ±(2^(k-1)-1); "int-full" adds level -2^(k-1)
VARIANTS = (("int", {"dtype": "int"}), ("int-full", {"dtype": "int", "full_range": True}), ("nf", {"dtype": "nf"}),
            ("float", {"dtype": "float"}), ("quantile", {"dtype": "quantile"}), ("kmeans", {"dtype": "kmeans"}),
            ("log2", {"dtype": "log2"}))
BITS = (2, 3, 4, 8)
BLOCKS = (32, 64, 128, 0)  # 0: per output channel
# artifacts whose CPU latency is measured (on --latency-models); the other runs benchmark once, unreported
WANTED_LATENCY = {"fp32", "int8-B32-full", "int4-B32-full", "int4-B64-full", "int4-B128-full", "int3-B64-full",
                  "int2-B64-full", "nf4-B64", "kmeans4-B64", "ort-MatMulNBitsQuantizer-B32",
                  "ort-MatMulNBitsQuantizer-B128"}
NO_LATENCY = BenchmarkSettings(warmup=0, runs=1)


def _overrides(fields: dict) -> tuple[str, ...]:
    return tuple(f"quantize.{key}={str(value).lower() if isinstance(value, bool) else value}"
                 for key, value in fields.items())


def ort_perplexity(path: Path, task, windows, options: dict | None = None) -> float:
    return task.evaluate(logits_fn(create_session(path, options=options)), windows)


def grid_configs(dtypes=tuple(v for v, _ in VARIANTS), bits_list=BITS, blocks=BLOCKS):
    """(row dtype, quantize fields) for each grid point, then the GPTQ and weighted k-means rows (block 64) whose
    dtype and bits are in the grid and when 64 is one of its block sizes."""
    for variant, fields in VARIANTS:
        if variant not in dtypes:
            continue
        for bits in bits_list:
            for block in blocks:
                yield variant, {**fields, "bits": bits, "block_size": block}
    if 64 not in blocks:
        return
    for bits in (3, 4):
        if "int-full" in dtypes and bits in bits_list:
            yield "int-full", {"dtype": "int", "bits": bits, "block_size": 64, "method": "gptq", "full_range": True}
    for bits in (3, 4):
        if "kmeans" in dtypes and bits in bits_list:
            yield "kmeans", {"dtype": "kmeans", "bits": bits, "block_size": 64, "activation_weighted": True}


def ort_matmulnbits(fp32_path: Path, out: Path, block_size: int) -> Path:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(fp32_path), bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    onnx.save(quantizer.model.model, out)
    return out


def _latency_fields(report: dict) -> dict:
    measured = report["latency"]["cpu"]
    return {"latency_cpu": {k: v for k, v in measured.items() if k.startswith("batch")},
            "peak_rss_bytes": report["memory"]["cpu"]["peak_rss_bytes"]}


def _print_latency(name: str, row: dict) -> None:
    print(f"{name}: latency {row['label']:<30} b1 {row['latency_cpu']['batch1']['p50_ms']:.3f} ms "
          f"b16 {row['latency_cpu']['batch16']['p50_ms']:.2f} ms", flush=True)


def compress(name: str, out_dir: Path, overrides: tuple[str, ...], windows_count: int, bench: BenchmarkSettings):
    """One grid point through `compress run`'s pipeline: the fp32 recipe plus the quantize overrides."""
    options = RunOptions(recipe="fp32", overrides=overrides, eval_limit=windows_count, force=True, bench=bench,
                         progress=False)
    return run(Path(name), out_dir, options, log=lambda _: None)


def run_model(name: str, windows_count: int, scratch: Path, latency: bool, runs: int,
              grid: dict | None = None) -> list[dict]:
    grid = grid or {}
    timed = BenchmarkSettings(warmup=10, runs=runs)
    scratch = scratch / name
    started = time.perf_counter()
    fp32 = compress(name, scratch / "fp32", (), windows_count,
                    timed if latency and "fp32" in WANTED_LATENCY else NO_LATENCY)
    fp32_path = Path(fp32["artifact"]["path"])  # <out>/model.onnx of the fp32 run
    rows = [{"model": name, "params": fp32["model"]["params"], "label": "fp32", "dtype": "fp32", "bits": 32,
             "block_size": None, "method": "-", "total_model_bits": fp32["total_model_bits"],
             "bits_per_param": fp32["bits_per_param"], "artifact_bytes": fp32["artifact"]["bytes"],
             "ppl_torch": fp32["accuracy"]["torch"], "ppl_ort": fp32["accuracy"]["onnxruntime"]["cpu"]}]
    if latency and "fp32" in WANTED_LATENCY:
        rows[0].update(_latency_fields(fp32))
    print(f"{name}: fp32 ppl {rows[0]['ppl_ort']:.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    if "latency_cpu" in rows[0]:
        _print_latency(name, rows[0])
    for variant, fields in grid_configs(**grid):
        started = time.perf_counter()
        overrides = _overrides(fields)
        label = resolve_recipe("fp32", overrides).passes[0][1].label()
        measure = latency and label in WANTED_LATENCY
        report = compress(name, scratch / label, overrides, windows_count, timed if measure else NO_LATENCY)
        quantize = report["passes"][0]
        row = {"model": name, "params": report["model"]["params"], "label": quantize["label"], "dtype": variant,
               "activation_weighted": quantize["config"]["activation_weighted"],
               "bits": quantize["config"]["bits"], "block_size": quantize["config"]["block_size"],
               "method": quantize["config"]["method"],
               "total_model_bits": report["total_model_bits"], "bits_per_param": report["bits_per_param"],
               "artifact_bytes": report["artifact"]["bytes"],
               "lowered": len((report["artifact"]["lowering"] or {}).get("lowered", [])),
               "skipped_layers": len(quantize["skipped"]),
               "ppl_torch": report["accuracy"]["torch"], "ppl_ort": report["accuracy"]["onnxruntime"]["cpu"]}
        if measure:
            row.update(_latency_fields(report))
        rows.append(row)
        print(f"{name}: {row['label']:<22} ppl ort {row['ppl_ort']:.4f} torch {row['ppl_torch']:.4f} "
              f"{row['bits_per_param']:.3f} b/p ({time.perf_counter() - started:.1f} s)", flush=True)
        if measure:
            _print_latency(name, row)
    task = TASKS["gpt"]
    config = fp32["model"]["config"]
    windows = task.heldout_data(config, windows_count)
    for block in (32, 128):
        label = f"ort-MatMulNBitsQuantizer-B{block}"
        path = ort_matmulnbits(fp32_path, scratch / f"ort-mnb-B{block}.onnx", block)
        row = {"model": name, "params": fp32["model"]["params"], "label": label,
               "dtype": "int (ORT)", "bits": 4, "block_size": block, "method": "ort-rtn",
               "total_model_bits": None, "bits_per_param": None, "artifact_bytes": path.stat().st_size,
               "ppl_torch": None, "ppl_ort": ort_perplexity(path, task, windows)}
        rows.append(row)
        print(f"{name}: {label:<22} ppl ort {row['ppl_ort']:.4f}", flush=True)
        if latency and label in WANTED_LATENCY:
            measured = run_benchmark(path, task, config, "cpu", timed)
            row["latency_cpu"] = {k: v for k, v in measured.items() if k.startswith("batch")}
            row["peak_rss_bytes"] = measured["memory"]["peak_rss_bytes"]
            _print_latency(name, row)
    return rows


def _block_name(block) -> str:
    return {0: "channel", -1: "tensor", None: "-"}.get(block, str(block))


def _grid(meta: dict) -> tuple[list[str], list[int], list[int]]:
    grid = meta.get("grid", {})
    return (list(grid.get("dtypes", [v for v, _ in VARIANTS])), list(grid.get("bits", BITS)),
            list(grid.get("blocks", BLOCKS)))


def render_markdown(rows: list[dict], meta: dict) -> str:
    dtypes, bits_list, blocks = _grid(meta)
    lines = ["# k-bit grid on the GPT samples", "",
             f"Held-out perplexity per byte through ONNX Runtime {meta['onnxruntime']} (CPU EP, default session) on "
             f"the first {meta['windows']} held-out windows of 128 bytes; bits/param = total model bits / params "
             "(codes at k bits, scales fp32, zero points and codebooks as stored, unquantized tensors at 32 bits). "
             "Each row is one `compress run` (fp32 recipe + `--set quantize.*`), read from its report.json. "
             f"Machine: {meta['machine']}. Generated by `python benchmarks/kbit_grid.py` in {meta['seconds']:.0f} s.",
             ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fp32 = mine[0]
        lines += [f"## {model} ({fp32['params']:,} params): fp32 perplexity {fp32['ppl_ort']:.4f} "
                  f"(torch {fp32['ppl_torch']:.4f}), {fp32['artifact_bytes']:,} bytes", "",
                  "perplexity (bits/param) by block size B:", "",
                  "| dtype | k | " + " | ".join(f"B={_block_name(b)}" for b in blocks) + " |",
                  "|---|---|" + "---|" * len(blocks)]
        for dtype in dtypes:
            for bits in bits_list:
                cells = []
                for block in blocks:
                    row = next(r for r in mine if r["dtype"] == dtype and r["bits"] == bits
                               and r["block_size"] == block and r["method"] == "rtn"
                               and not r.get("activation_weighted"))
                    partial = "*" if row["skipped_layers"] else ""
                    cells.append(f"{row['ppl_ort']:.3f}{partial} ({row['bits_per_param']:.2f})")
                lines.append(f"| {dtype} | {bits} | " + " | ".join(cells) + " |")
        if any(r.get("skipped_layers") for r in mine):
            lines += ["", "\\* some Linear layers were left fp32: their input width is not a multiple of B."]
        lines += ["", "| variant | perplexity ORT | perplexity torch | bits/param | artifact bytes |",
                  "|---|---|---|---|---|"]
        for row in mine:
            if row["method"] != "rtn" or row.get("activation_weighted"):
                torch_ppl = "-" if row["ppl_torch"] is None else f"{row['ppl_torch']:.4f}"
                bpp = "-" if row["bits_per_param"] is None else f"{row['bits_per_param']:.3f}"
                lines.append(f"| {row['label']} | {row['ppl_ort']:.4f} | {torch_ppl} | {bpp} | "
                             f"{row['artifact_bytes']:,} |")
        timed = [r for r in mine if "latency_cpu" in r]
        if timed:
            base = timed[0]["latency_cpu"]
            lines += ["", "ONNX Runtime CPU latency, p50 ms (speed-up vs fp32), "
                      f"{meta['cpu_count']} threads; peak RSS of the serving process:", "",
                      "| artifact | batch 1 | batch 16 | peak RSS MiB | bytes |", "|---|---|---|---|---|"]
            for row in timed:
                cells = [f"{row['latency_cpu'][b]['p50_ms']:.3f} ({base[b]['p50_ms'] / row['latency_cpu'][b]['p50_ms']:.2f}x)"
                         for b in ("batch1", "batch16")]
                lines.append(f"| {row['label']} | {cells[0]} | {cells[1]} | {row['peak_rss_bytes'] / 2**20:.0f} | "
                             f"{row['artifact_bytes']:,} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, dtypes=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dtypes or [v for v, _ in VARIANTS])
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["total_model_bits"]]
        for dtype in dtypes:
            points = sorted((r["total_model_bits"], r["ppl_ort"]) for r in mine
                            if r["dtype"] == dtype and r["method"] == "rtn" and r["bits"] > 2)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", ms=3, label=dtype)
        fp32 = mine[0]
        ax.axhline(fp32["ppl_ort"], color="k", lw=0.8, ls="--", label="fp32")
        ax.set_xscale("log")
        ax.set_title(f"{model}: k = 3..8")
        ax.set_xlabel("total model bits")
        ax.set_ylabel("held-out perplexity (ORT)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main() -> None:
    import os
    import platform

    import onnxruntime

    variants = [v for v, _ in VARIANTS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-s,gpt-m,gpt-l")
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--latency-models", default="gpt-s,gpt-l")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dtypes", default=",".join(variants),
                        help=f"comma list of grid rows among {', '.join(variants)} (the GPTQ rows come with "
                             "int-full, the activation-weighted k-means rows with kmeans)")
    parser.add_argument("--bits", default=",".join(map(str, BITS)), help="comma list of bit widths")
    parser.add_argument("--blocks", default=",".join(map(str, BLOCKS)),
                        help="comma list of block sizes; 0 = per output channel")
    args = parser.parse_args()
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    unknown = [d for d in dtypes if d not in variants]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)} (known: {', '.join(variants)})")
    grid = {"dtypes": dtypes, "bits_list": _int_list(args.bits), "blocks": _int_list(args.blocks)}
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            rows += run_model(name, args.windows, Path(scratch), name in args.latency_models.split(","), args.runs,
                              grid)
    meta = {"onnxruntime": onnxruntime.__version__, "windows": args.windows, "cpu_count": os.cpu_count(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "seconds": time.perf_counter() - started,
            "grid": {"dtypes": list(grid["dtypes"]), "bits": list(grid["bits_list"]),
                     "blocks": list(grid["blocks"])}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kbit_grid.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "kbit_grid.md").write_text(render_markdown(rows, meta))
    plot(rows, args.out / "kbit_grid.png", grid["dtypes"])
    print(f"wrote {args.out / 'kbit_grid.md'}")


if __name__ == "__main__":
    main()

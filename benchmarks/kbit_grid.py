"""k-bit grid on the GPT samples: held-out perplexity measured through ONNX Runtime on each exported artifact,
against total model bits, for every data type x bits x block size; plus ONNX Runtime's own MatMulNBitsQuantizer
(RTN, block 32 and 128, accuracy level 4) on our fp32 export, and CPU latency of the headline artifacts.

    python benchmarks/kbit_grid.py [--models gpt-xs,gpt-s,gpt-m,gpt-l] [--windows 300] [--latency-models gpt-l]

Writes benchmarks/results/kbit_grid.json, kbit_grid.md and kbit_grid.png. Perplexity is per byte on the first
--windows held-out windows of 128 bytes (the same windows for every row of a model).
"""
import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.inputs.checkpoint import load_checkpoint  # noqa: E402
from compressor.ort_runtime import create_session, logits_fn  # noqa: E402
from compressor.tasks import TASKS  # noqa: E402
from compressor.validate import BenchmarkSettings, run_benchmark, torch_logits_fn  # noqa: E402
from exporters.onnx_export import export_onnx, finalize
from compressor.artifact import save_onnx  # noqa: E402
from exporters.qdq import lower_to_qdq  # noqa: E402
from passes.model_bits import total_model_bits  # noqa: E402
from passes.quantize import QuantizeConfig, quantize_model  # noqa: E402
from samples.registry import SHIPPED_DIR  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# (row name, QuantizeConfig fields): "int" is the paper's absmax ±(2^(k-1)-1); "int-full" adds level -2^(k-1)
VARIANTS = (("int", {"dtype": "int"}), ("int-full", {"dtype": "int", "full_range": True}), ("nf", {"dtype": "nf"}),
            ("float", {"dtype": "float"}), ("quantile", {"dtype": "quantile"}), ("kmeans", {"dtype": "kmeans"}),
            ("log2", {"dtype": "log2"}))
BITS = (2, 3, 4, 8)
BLOCKS = (32, 64, 128, 0)


def swap_weights(proto: onnx.ModelProto, original: dict[bytes, np.ndarray]) -> onnx.ModelProto:
    """The fp32 export with each Linear weight column replaced by its fake-quantized version, matched by the
    bytes of the original column: one export serves every grid point (torch.onnx.export takes ~6 s)."""
    proto = copy.deepcopy(proto)
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim != 2 or array.dtype != np.float32:
            continue
        columns = np.ascontiguousarray(array.T)
        replaced = [original.get(col.tobytes()) for col in columns]
        if all(r is not None for r in replaced):
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.stack(replaced).T), init.name))
    return proto


def column_map(reference_model, quantized_model) -> dict[bytes, np.ndarray]:
    mapping = {}
    for (name, ref), (_, new) in zip(reference_model.named_modules(), quantized_model.named_modules()):
        if getattr(new, "quantized", None) is not None:
            for row_ref, row_new in zip(ref.weight.detach().numpy(), new.weight.detach().numpy()):
                mapping[row_ref.tobytes()] = row_new
    return mapping


def ort_perplexity(path: Path, task, windows, options: dict | None = None) -> float:
    return task.evaluate(logits_fn(create_session(path, options=options)), windows)


def grid_configs():
    for variant, fields in VARIANTS:
        for bits in BITS:
            for block in BLOCKS:
                yield variant, QuantizeConfig(bits=bits, block_size=block, **fields)
    for bits in (3, 4):
        yield "int-full", QuantizeConfig(dtype="int", bits=bits, block_size=64, method="gptq", full_range=True)
    for bits in (3, 4):
        yield "kmeans", QuantizeConfig(dtype="kmeans", bits=bits, block_size=64, activation_weighted=True)


def ort_matmulnbits(fp32_path: Path, out: Path, block_size: int) -> Path:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(fp32_path), bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    onnx.save(quantizer.model.model, out)
    return out


def run_model(name: str, windows_count: int, scratch: Path, latency: bool, runs: int) -> list[dict]:
    checkpoint = load_checkpoint(SHIPPED_DIR / name)
    task = TASKS["gpt"]
    windows = task.heldout_data(checkpoint.config, windows_count)
    calibration = task.calibration_data(checkpoint.config, 64)
    fp32_proto = export_onnx(checkpoint.model, task.parity_inputs(windows), task.dynamic_axes(checkpoint.config),
                             task.OUTPUT_NAME)
    fp32_path = scratch / f"{name}-fp32.onnx"
    save_onnx(finalize(copy.deepcopy(fp32_proto), {}), fp32_path)
    bits = total_model_bits(checkpoint.model)
    rows = [{"model": name, "params": bits["params"], "label": "fp32", "dtype": "fp32", "bits": 32,
             "block_size": None, "method": "-", "total_model_bits": bits["total_model_bits"],
             "bits_per_param": bits["bits_per_param"], "artifact_bytes": fp32_path.stat().st_size,
             "ppl_torch": task.evaluate(torch_logits_fn(checkpoint.model, task.INPUT_NAMES), windows),
             "ppl_ort": ort_perplexity(fp32_path, task, windows), "path": fp32_path}]
    print(f"{name}: fp32 ppl {rows[0]['ppl_ort']:.4f}", flush=True)
    for variant, config in grid_configs():
        started = time.perf_counter()
        model = copy.deepcopy(checkpoint.model)
        record = quantize_model(model, config, calibration if config.needs_calibration else None)
        proto, lowering = lower_to_qdq(swap_weights(fp32_proto, column_map(checkpoint.model, model)), model)
        path = scratch / f"{name}-{config.label()}.onnx"
        save_onnx(finalize(proto, {}), path)
        row = {"model": name, "params": record["params"], "label": config.label(), "dtype": variant,
               "activation_weighted": config.activation_weighted,
               "bits": config.bits, "block_size": config.block_size, "method": config.method,
               "total_model_bits": record["total_model_bits"], "bits_per_param": record["bits_per_param"],
               "artifact_bytes": path.stat().st_size, "lowered": len(lowering["lowered"]),
               "skipped_layers": len(record["skipped"]),
               "ppl_torch": task.evaluate(torch_logits_fn(model, task.INPUT_NAMES), windows),
               "ppl_ort": ort_perplexity(path, task, windows), "path": path}
        rows.append(row)
        print(f"{name}: {config.label():<22} ppl ort {row['ppl_ort']:.4f} torch {row['ppl_torch']:.4f} "
              f"{row['bits_per_param']:.3f} b/p ({time.perf_counter() - started:.1f} s)", flush=True)
    for block in (32, 128):
        path = ort_matmulnbits(fp32_path, scratch / f"{name}-ort-mnb-B{block}.onnx", block)
        rows.append({"model": name, "params": bits["params"], "label": f"ort-MatMulNBitsQuantizer-B{block}",
                     "dtype": "int (ORT)", "bits": 4, "block_size": block, "method": "ort-rtn",
                     "total_model_bits": None, "bits_per_param": None, "artifact_bytes": path.stat().st_size,
                     "ppl_torch": None, "ppl_ort": ort_perplexity(path, task, windows), "path": path})
        print(f"{name}: {rows[-1]['label']:<22} ppl ort {rows[-1]['ppl_ort']:.4f}", flush=True)
    if latency:
        wanted = {"fp32", "int8-B32-full", "int4-B32-full", "int4-B64-full", "int4-B128-full", "int3-B64-full",
                  "int2-B64-full", "nf4-B64", "kmeans4-B64", "ort-MatMulNBitsQuantizer-B32",
                  "ort-MatMulNBitsQuantizer-B128"}
        settings = BenchmarkSettings(warmup=10, runs=runs)
        for row in rows:
            if row["label"] in wanted:
                measured = run_benchmark(row["path"], task, checkpoint.config, "cpu", settings)
                row["latency_cpu"] = {k: v for k, v in measured.items() if k.startswith("batch")}
                row["peak_rss_bytes"] = measured["memory"]["peak_rss_bytes"]
                print(f"{name}: latency {row['label']:<30} b1 {row['latency_cpu']['batch1']['p50_ms']:.3f} ms "
                      f"b16 {row['latency_cpu']['batch16']['p50_ms']:.2f} ms", flush=True)
    for row in rows:
        row.pop("path")
    return rows


def _block_name(block) -> str:
    return {0: "channel", -1: "tensor", None: "-"}.get(block, str(block))


def render_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# k-bit grid on the GPT samples", "",
             f"Held-out perplexity per byte through ONNX Runtime {meta['onnxruntime']} (CPU EP, default session) on "
             f"the first {meta['windows']} held-out windows of 128 bytes; bits/param = total model bits / params "
             "(codes at k bits, scales fp32, zero points and codebooks as stored, unquantized tensors at 32 bits). "
             f"Machine: {meta['machine']}. Generated by `python benchmarks/kbit_grid.py` in {meta['seconds']:.0f} s.",
             ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fp32 = mine[0]
        lines += [f"## {model} ({fp32['params']:,} params): fp32 perplexity {fp32['ppl_ort']:.4f} "
                  f"(torch {fp32['ppl_torch']:.4f}), {fp32['artifact_bytes']:,} bytes", "",
                  "perplexity (bits/param) by block size B:", "",
                  "| dtype | k | " + " | ".join(f"B={_block_name(b)}" for b in BLOCKS) + " |",
                  "|---|---|" + "---|" * len(BLOCKS)]
        for dtype, _ in VARIANTS:
            for bits in BITS:
                cells = []
                for block in BLOCKS:
                    row = next(r for r in mine if r["dtype"] == dtype and r["bits"] == bits
                               and r["block_size"] == block and r["method"] == "rtn")
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


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["total_model_bits"]]
        for dtype, _ in VARIANTS:
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


def main() -> None:
    import os
    import platform

    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-s,gpt-m,gpt-l")
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--latency-models", default="gpt-s,gpt-l")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            rows += run_model(name, args.windows, Path(scratch), name in args.latency_models.split(","), args.runs)
    meta = {"onnxruntime": onnxruntime.__version__, "windows": args.windows, "cpu_count": os.cpu_count(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kbit_grid.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "kbit_grid.md").write_text(render_markdown(rows, meta))
    plot(rows, args.out / "kbit_grid.png")
    print(f"wrote {args.out / 'kbit_grid.md'}")


if __name__ == "__main__":
    main()

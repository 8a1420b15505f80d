"""report.json (the stable, documented schema: docs/report-schema.md) and its readable twin report.md."""
import json
import os
import platform
from pathlib import Path

from compressor.version import __version__
from compressor.atomic import atomic_write_text
from compressor.plots import PLOTS, write_plots

SCHEMA_VERSION = 1


def environment() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def write_reports(out_dir: Path, report: dict, plots: bool = True) -> None:
    """Plots first, so that report.json can list them (report["plots"]) and report.md embed them."""
    report["plots"] = write_plots(out_dir, report) if plots else []
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report))


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


UNGATED = "no (default kernel: the exact entry and the accuracy agreement are)"


def render_markdown(report: dict) -> str:
    model, artifact, accuracy = report["model"], report["artifact"], report["accuracy"]
    lines = [
        f"# compressor report: {model['name']}",
        "",
        f"**Summary:** {summary_text(report['summary'])}",
        "",
        f"- source: `{model['source']}` ({model['family']}, {model['params']:,} parameters)",
        f"- recipe: `{report['recipe']['name']}`",
        f"- artifact: `{artifact['path']}`, {artifact['bytes']:,} bytes, opset {artifact['opset']}, "
        f"IR {artifact['ir_version']}, sha256 `{artifact['sha256'][:16]}…`",
        f"- total model bits: {report['total_model_bits']:,} ({report['bits_per_param']:.3f} bits/param, "
        f"{model['params']:,} params after the passes, {model['input_params']:,} before)",
        "",
        f"## Accuracy on held-out data ({accuracy['metric']}, {accuracy['heldout_examples']} examples, "
        f"{'higher' if accuracy['higher_is_better'] else 'lower'} is better)",
        "",
        "| model | " + accuracy["metric"] + " | agrees with torch |",
        "|---|---|---|",
        f"| input model, torch | {_fmt(accuracy['reference'])} | |",
        f"| compressed model, torch | {_fmt(accuracy['torch'])} | |",
    ]
    for provider, value in accuracy["onnxruntime"].items():
        agreement = accuracy["agreement"][provider]
        verdict = "yes" if agreement["passed"] else "**NO**"
        lines.append(f"| ONNX Runtime {provider} | {_fmt(value)} | {verdict} ({agreement['kind']} delta "
                     f"{_fmt(agreement['delta'], 2)} <= {agreement['tolerance']}) |")
    for provider, metrics in accuracy.get("side_metrics", {}).items():
        lines += ["", f"Side metrics, ONNX Runtime {provider}: "
                  + ", ".join(f"{name} {_fmt(value, 6)}" for name, value in metrics.items())]
    if report["passes"]:
        lines += ["", "## Passes (held-out metric in torch after each)", "",
                  f"| pass | what | params | bits/param | {accuracy['metric']} |", "|---|---|---|---|---|",
                  f"| input | | {model['input_params']:,} | 32 | {_fmt(accuracy['reference'])} |"]
        for entry in report["passes"]:
            lines.append(f"| {entry['name']} | {entry.get('label', '')} | {entry['params']:,} | "
                         f"{entry['bits_per_param']:.3f} | {_fmt(entry[accuracy['metric']])} |")
    lines += allocation_lines(report["passes"])
    parity = report["parity"]
    lines += ["", "## Logit parity (torch vs ONNX Runtime)", "",
              f"max abs {_fmt(parity['max_abs'], 3)}, max rel {_fmt(parity['max_rel'], 3)} "
              f"(tolerance {parity['tolerance_max_rel']}): {'pass' if parity['passed'] else '**FAIL**'}", "",
              "| session | max rel | tolerance | gated |", "|---|---|---|---|",
              *[f"| {name} | {_fmt(p['max_rel'], 3)} | {p['tolerance_max_rel']} | "
                f"{'yes' if p.get('gated', True) else UNGATED} |"
                for name, p in parity["by_provider"].items()], "",
              "## Latency and memory (ONNX Runtime, after warm-up)", "",
              "| provider | batch | p50 ms | p90 ms | peak RSS MiB |", "|---|---|---|---|---|"]
    for provider, latency in report["latency"].items():
        rss = report["memory"][provider]["peak_rss_bytes"] / 2**20
        for key, stats in latency.items():
            if key.startswith("batch"):
                lines.append(f"| {provider} | {key[5:]} | {_fmt(stats['p50_ms'])} | {_fmt(stats['p90_ms'])} | "
                             f"{rss:.0f} |")
        for key, why in latency.get("skipped_batches", {}).items():
            lines.append(f"| {provider} | {key[5:]} | {why} | | |")
    for provider, generation in report.get("generation", {}).items():
        lines += ["", f"## Generation, ONNX Runtime {provider} (KV cache, greedy; "
                  f"{generation['artifact']['prompt_tokens']}-token prompt, "
                  f"{generation['artifact']['new_tokens']} new tokens; medians)", "",
                  "| model | prefill ms | decode tokens/s | ms/token | peak RSS MiB |", "|---|---|---|---|---|"]
        for name, label in (("input", "input model, same export, not compressed"), ("artifact", "this artifact")):
            if name in generation:
                g = generation[name]
                lines.append(f"| {label} | {_fmt(g['prefill_ms'])} | {_fmt(g['decode_tokens_per_s'])} | "
                             f"{_fmt(g['decode_ms_per_token'])} | {g['peak_rss_mb']:.0f} |")
        if "speedup" in generation:
            lines += ["", f"Speed-up over the input model: decode {generation['speedup']['decode']:.2f}x, "
                      f"prefill {generation['speedup']['prefill']:.2f}x"]
    if "compress_peak_rss_mb" in report["memory"]:
        lines += ["", f"Peak RSS of `compress run` itself (load, passes, export, validation): "
                  f"{report['memory']['compress_peak_rss_mb']:.0f} MiB"]
    if report.get("plots"):
        lines += ["", "## Plots"]
        for name in report["plots"]:
            lines += ["", f"![{PLOTS[name][1] if name in PLOTS else name}]({name})"]
    env = report["environment"]
    lines += ["", f"_compressor {report['tool']['version']}, torch {env['torch']}, onnxruntime {env['onnxruntime']},"
              f" {env['cpu_count']} CPUs_", ""]
    return "\n".join(lines)


def allocation_lines(passes: list[dict]) -> list[str]:
    """The bit-budget allocator's choice per layer (quantize.budget_bits_per_param), when a pass made one."""
    lines = []
    for entry in passes:
        allocation = entry.get("allocation")
        if not allocation:
            continue
        lines += ["", f"## Bit allocation (budget {allocation['budget_bits_per_param']:g} bits/param: "
                  f"{allocation['total_model_bits']:,} of {allocation['budget_bits']:,} bits, "
                  f"{allocation['bits_per_param']:.4f} bits/param; {allocation['solver']})", "",
                  f"Predicted loss increase {_fmt(allocation['predicted_kl'], 3)} nats/token "
                  f"({allocation['sensitivity']}, {allocation['calibration_tokens']:,} calibration tokens).", "",
                  "| layer | candidate | params | bits/param | predicted KL |", "|---|---|---|---|---|"]
        lines += [f"| {row['module']} | {row['candidate']} | {row['params']:,} | "
                  f"{row['total_bits'] / row['params']:.3f} | {_fmt(row['predicted_kl'], 3)} |"
                  for row in allocation["layers"]]
        lines += [f"| {row['module']} | unquantized: {row['reason']} | | 32 | |" for row in allocation["unallocated"]]
    return lines


def summary_text(summary: dict) -> str:
    text = (f"{summary['bits_ratio']:.2f}x fewer total model bits and {summary['bytes_ratio']:.2f}x fewer bytes than "
            f"the fp32 input; {summary['metric']} {abs(summary['metric_change']):.2%} {summary['verdict']} "
            f"({summary['measured_by']})")
    for provider, speedup in summary.get("speedup", {}).items():
        text += f"; decodes {speedup['decode']:.2f}x, prefills {speedup['prefill']:.2f}x as fast ({provider})"
    return text


def tool_record() -> dict:
    return {"name": "compressor", "version": __version__}

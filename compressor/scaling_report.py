"""What `compress scaling` writes: scaling.json, the readable scaling.md and its PNG plots (metric vs total model
bits: one line per k, one per data type, the Pareto front with the budget runs), rendered as compressor.plots
renders a run's (Agg canvas, default style, the same data giving the same bytes)."""
import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from compressor.atomic import atomic_write_bytes, atomic_write_text
from compressor.plots import render_png
from compressor.pareto import pareto_front

PLOTS = {"scaling_by_bits.png": "metric vs total model bits, one line per k (each k's own Pareto front)",
         "scaling_by_dtype.png": "metric vs total model bits, one line per data type (its own Pareto front)",
         "scaling_pareto.png": "all runs, the Pareto front and the bit-budget allocator runs"}


def write_outputs(out_dir: Path, result: dict) -> None:
    result["plots"] = []
    for name, render in (("scaling_by_bits.png", by_bits_figure), ("scaling_by_dtype.png", by_dtype_figure),
                         ("scaling_pareto.png", pareto_figure)):
        png = render_png(render, result)
        if png is not None:
            atomic_write_bytes(out_dir / name, png)
            result["plots"].append(name)
    atomic_write_text(out_dir / "scaling.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out_dir / "scaling.md", render_markdown(result))


def _ok(result: dict) -> list[dict]:
    return [r for r in result["runs"] if r["status"] == "ok" and math.isfinite(r["metric"])]


def _fmt(value) -> str:
    if value is None:
        return "-"
    # four decimals: 4-bit configurations of one model differ in the third
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}" if abs(value) < 1e5 else f"{value:.3e}"


def render_markdown(result: dict) -> str:
    grid, runs = result["grid"], result["runs"]
    metric = result["metric"] or "metric"
    direction = "higher" if result["higher_is_better"] else "lower"
    timing = result.get("timing", {})
    lines = [f"# k-bit scaling sweep: `{result['checkpoint']}`", "",
             f"{metric} ({direction} is better) measured by {result['measured_by']} on each artifact, "
             f"{result['settings']['eval_limit'] or 'all'} held-out examples, seed {result['settings']['seed']}; "
             f"input model {metric} {_fmt(result['reference'])} (torch). Total model bits as each run's report "
             f"counts them (codes, scales, zero points, codebooks as stored; unquantized tensors at 32 bits); "
             f"bits/param = total / {result['params']:,} params." if result["params"] else "no run was measured.",
             "", f"{len(runs)} configurations: {timing.get('measured', '?')} measured, {timing.get('resumed', '?')} "
             f"reused from an earlier run, in {timing.get('seconds', 0):.0f} s with {timing.get('workers', 1)} "
             f"worker(s) on {timing.get('cpu_count', '?')} CPUs; the configurations' own times add up to "
             f"{timing.get('sum_run_seconds', 0):.0f} s wall, {timing.get('sum_run_cpu_seconds', 0):.0f} CPU-s.", ""]
    uniform = [r for r in runs if r.get("budget_bits_per_param") is None]
    if uniform:
        lines += [f"## {metric} (bits/param) by data type, k and block size", "",
                  "| dtype | k | " + " | ".join(grid["block_sizes"]) + " |",
                  "|---|---|" + "---|" * len(grid["block_sizes"])]
        for dtype in grid["dtypes"]:
            for bits in grid["bits"]:
                cells = []
                for block in grid["block_sizes"]:
                    row = next((r for r in uniform if r["dtype"] == dtype and r["bits"] == bits
                                and r["block_size"] == block), None)
                    if row is None or row["status"] != "ok":
                        cells.append("skipped" if row else "-")
                    else:
                        partial = "*" if row["layers_skipped"] else ""
                        cells.append(f"{_fmt(row['metric'])}{partial} ({row['bits_per_param']:.2f})")
                lines.append(f"| {dtype} | {bits} | " + " | ".join(cells) + " |")
        if any(r["status"] == "ok" and r["layers_skipped"] for r in uniform):
            lines += ["", "\\* some layers were left unquantized (their input width is not a multiple of the block)."]
    lines += ["", "## Pareto front (no run has fewer total model bits and a better metric)", "",
              f"| run | total model bits | bits/param | {metric} |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['total_model_bits']:,} | {r['bits_per_param']:.3f} | {_fmt(r['metric'])} |"
              for r in result["pareto"]]
    lines += ["", "## Best run per bit budget (bits/param, from --budget and each k of the grid)", "",
              f"| budget | from | best run | bits/param | {metric} |", "|---|---|---|---|---|"]
    for entry in result["best_per_budget"]:
        best = entry["best"]
        lines.append(f"| ≤ {entry['bits_per_param']:g} | {entry['from']} | "
                     + (f"{best['label']} | {best['bits_per_param']:.3f} | {_fmt(best['metric'])} |" if best
                        else "none fits | | |"))
    budget_runs = [r for r in runs if r.get("budget_bits_per_param") is not None]
    if budget_runs:
        lines += ["", "## Bit-budget allocator runs", "", f"| budget | bits/param | {metric} | allocation |",
                  "|---|---|---|---|"]
        for r in budget_runs:
            if r["status"] == "ok":
                lines.append(f"| {r['budget_bits_per_param']:g} | {r['bits_per_param']:.3f} | {_fmt(r['metric'])} | "
                             f"{r.get('quantize_label') or ''} |")
            else:
                lines.append(f"| {r['budget_bits_per_param']:g} | | skipped | {r['reason']} |")
    skipped = [r for r in runs if r["status"] != "ok"]
    if skipped:
        lines += ["", "## Skipped configurations", ""] + [f"- {r['label']}: {r['reason']}" for r in skipped]
    if result.get("plots"):
        lines += ["", "## Plots"] + [f"\n![{PLOTS[name]}]({name})" for name in result["plots"]]
    return "\n".join(lines) + "\n"


def _axes(result: dict, title: str):
    figure = Figure(figsize=(8, 5.2), layout="constrained")
    ax = figure.subplots()
    ax.set_xscale("log")
    values = [r["metric"] for r in _ok(result)]
    reference = result["reference"]
    if reference is not None:
        ax.axhline(reference, color="k", lw=0.8, ls="--", label="input model (torch)")
    if values and reference is not None and reference > 0:
        # 2-bit perplexities run to 10x the input's and would flatten the rest: the axis stops at 1.4x (accuracy:
        # 0.6x) the input's metric, and the title says how many runs lie beyond
        low, high = min(values + [reference]), max(values + [reference])
        limits = (low, min(high, 1.4 * reference)) if not result["higher_is_better"] else \
            (max(low, 0.6 * reference), high)
        pad = 0.03 * (limits[1] - limits[0] or abs(reference))
        ax.set_ylim(limits[0] - pad, limits[1] + pad)
        beyond = sum(not limits[0] <= v <= limits[1] for v in values)
        title += f" ({beyond} runs off the axis)" if beyond else ""
    ax.set_xlabel("total model bits")
    better = "higher" if result["higher_is_better"] else "lower"
    ax.set_ylabel(f"{result['metric']} ({better} is better, {result['measured_by']})")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return figure, ax


def _front_lines(result: dict, key: str, title: str) -> Figure | None:
    ok = [r for r in _ok(result) if r.get("budget_bits_per_param") is None]
    if not ok:
        return None
    figure, ax = _axes(result, title)
    groups = dict.fromkeys(r[key] for r in ok)
    for i, group in enumerate(groups):
        mine = [r for r in ok if r[key] == group]
        front = pareto_front(mine, result["higher_is_better"])
        colour = f"C{i % 10}"
        ax.plot([r["total_model_bits"] for r in mine], [r["metric"] for r in mine], "o", ms=3, alpha=0.35,
                color=colour)
        ax.plot([r["total_model_bits"] for r in front], [r["metric"] for r in front], "o-", ms=4, color=colour,
                label=f"{key} {group}" if key == "bits" else str(group))
    ax.legend(fontsize=8)
    return figure


def by_bits_figure(result: dict) -> Figure | None:
    return _front_lines(result, "bits", "one line per k (its configurations' front; dots: all of them)")


def by_dtype_figure(result: dict) -> Figure | None:
    return _front_lines(result, "dtype", "one line per data type (its configurations' front; dots: all of them)")


def pareto_figure(result: dict) -> Figure | None:
    ok = _ok(result)
    if not ok:
        return None
    figure, ax = _axes(result, "Pareto front over every configuration")
    uniform = [r for r in ok if r.get("budget_bits_per_param") is None]
    ax.plot([r["total_model_bits"] for r in uniform], [r["metric"] for r in uniform], "o", ms=3, color="0.6",
            label="uniform (dtype, k, block)")
    front = result["pareto"]
    ax.step([r["total_model_bits"] for r in front], [r["metric"] for r in front], "-", where="post", color="C0",
            label="Pareto front")
    ax.plot([r["total_model_bits"] for r in front], [r["metric"] for r in front], "o", ms=5, color="C0")
    for r in front:
        ax.annotate(r["label"], (r["total_model_bits"], r["metric"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    budget = sorted((r for r in ok if r.get("budget_bits_per_param") is not None),
                    key=lambda r: r["total_model_bits"])
    if budget:
        ax.plot([r["total_model_bits"] for r in budget], [r["metric"] for r in budget], "*-", ms=10, color="C3",
                label="bit-budget allocator")
    ax.legend(fontsize=8)
    return figure

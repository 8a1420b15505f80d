"""PNG plots of a run's report (docs/report-schema.md): the effect of each pass, accuracy vs size, latency per EP.

Rendered with the Agg canvas straight from a Figure (no pyplot, so the caller's backend is untouched), at a fixed
size and dpi, under matplotlib's default style (a user's matplotlibrc cannot change the picture) and without the
"Software" PNG text chunk: the same report always gives the same bytes.
"""
import io
import math
from pathlib import Path

import matplotlib
from matplotlib import style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from compressor.atomic import atomic_write_bytes

DPI = 100
PNG_METADATA = {"Software": None}  # matplotlib writes its version here by default; nothing else varies
INPUT_BITS_PER_PARAM = 32  # checkpoints load as fp32 (the input row of report.md's pass table says the same)


def write_plots(out_dir: Path, report: dict) -> list[str]:
    """Render every plot the report has data for into out_dir, atomically; returns the file names written."""
    written = []
    for name, (render, _) in PLOTS.items():
        png = render_png(render, report)
        if png is not None:
            atomic_write_bytes(out_dir / name, png)
            written.append(name)
    return written


def render_png(render, report: dict) -> bytes | None:
    """render(report) -> Figure, or None when the report has nothing to draw."""
    # default style: a user's matplotlibrc cannot change the bytes; no offset: tick labels are the values themselves
    with style.context("default"), matplotlib.rc_context({"axes.formatter.useoffset": False}):
        figure = render(report)
        if figure is None:
            return None
        FigureCanvasAgg(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, metadata=PNG_METADATA)
    return buffer.getvalue()


def _metric_label(accuracy: dict) -> str:
    better = "higher" if accuracy.get("higher_is_better") else "lower"
    return f"{accuracy.get('metric', 'metric')} ({better} is better)"


def _finite(value) -> float:
    """A number from the report as a float; NaN (not drawn) when it is missing, not a number or not finite."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _pad_ylim(ax, values: list[float], share: float = 0.2, min_relative: float = 1e-3) -> None:
    """Room above and below the finite values; a spread below min_relative of their size (fp32 torch vs ORT agree
    to ~1e-7) is widened to it, so the ticks stay short instead of listing the seventh decimal."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    pad = max((high - low) * share, max(abs(low), abs(high)) * min_relative, 1e-12)
    ax.set_ylim(low - pad, high + pad)


def _steps(report: dict) -> list[dict]:
    """The input model then one row per pass: label, params, size in MB, metric (NaN where unknown)."""
    model, accuracy = report["model"], report["accuracy"]
    metric = accuracy.get("metric")
    input_params = _finite(model.get("input_params", model.get("params")))
    rows = [{"label": "input", "params": input_params, "mb": input_params * INPUT_BITS_PER_PARAM / 8e6,
             "metric": _finite(accuracy.get("reference"))}]
    for index, entry in enumerate(report.get("passes") or [], start=1):
        rows.append({"label": f"{index}. {entry.get('name', '?')}\n{entry.get('label', '')}".strip(),
                     "params": _finite(entry.get("params")), "mb": _finite(entry.get("total_model_bits")) / 8e6,
                     "metric": _finite(entry.get(metric)) if metric else math.nan})
    return rows


def passes_figure(report: dict) -> Figure:
    """Three panels sharing the x axis (input, then each pass in order): params, total model size, held-out metric."""
    rows = _steps(report)
    positions = range(len(rows))
    figure = Figure(figsize=(max(7.5, 1.5 * len(rows)), 7.5), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    panels = (("params", "parameters", "tab:blue"), ("mb", "total model bits (MB)", "tab:orange"),
              ("metric", _metric_label(report["accuracy"]), "tab:green"))
    for ax, (key, ylabel, color) in zip(axes, panels):
        values = [row[key] for row in rows]
        ax.plot(positions, values, marker="o", color=color)
        for x, value in zip(positions, values):
            if not math.isnan(value):
                ax.annotate(f"{value:,.0f}" if key == "params" else f"{value:.4g}", (x, value),
                            textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(x=0.12)
        _pad_ylim(ax, values, share=0.25)
        ax.grid(alpha=0.3)
    axes[0].yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    axes[-1].set_xticks(list(positions), [row["label"] for row in rows], fontsize=8)
    axes[-1].set_xlabel("after pass (in recipe order; torch, held-out data)" if len(rows) > 1
                        else "input model (the recipe has no passes)")
    figure.suptitle(f"{report['model']['name']}: effect of each pass (recipe {report['recipe']['name']})")
    return figure


def accuracy_vs_size_figure(report: dict) -> Figure | None:
    """Held-out metric vs total model bits: the input, each pass step (torch), and the artifact under each EP."""
    rows = [row for row in _steps(report) if not (math.isnan(row["metric"]) or math.isnan(row["mb"]))]
    accuracy = report["accuracy"]
    artifact_mb = _finite(report.get("total_model_bits")) / 8e6
    artifact_points = [(provider, _finite(value)) for provider, value in (accuracy.get("onnxruntime") or {}).items()
                       if not (math.isnan(_finite(value)) or math.isnan(artifact_mb))]
    if not rows and not artifact_points:
        return None
    figure = Figure(figsize=(7.5, 5), layout="constrained")
    ax = figure.subplots()
    if rows:
        ax.plot([row["mb"] for row in rows], [row["metric"] for row in rows], marker="o", color="tab:blue",
                label="input, then after each pass (torch)")
        labels: dict[tuple[float, float], list[str]] = {}  # a pass that changes nothing lands on the last point
        for row in rows:
            labels.setdefault((row["mb"], row["metric"]), []).append(row["label"].replace("\n", " "))
        for point, names in labels.items():
            ax.annotate("\n".join(names), point, textcoords="offset points", xytext=(6, 6), va="bottom", fontsize=8)
    for (provider, value), marker in zip(artifact_points, ("X", "P", "D", "s")):
        ax.scatter([artifact_mb], [value], marker=marker, s=80, zorder=3, label=f"artifact, ONNX Runtime {provider}")
    ax.set_xlabel("total model bits (MB)")
    ax.set_ylabel(_metric_label(accuracy))
    ax.margins(x=0.2)
    _pad_ylim(ax, [row["metric"] for row in rows] + [value for _, value in artifact_points])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{report['model']['name']}: held-out {accuracy.get('metric', 'metric')} vs size "
                 f"({accuracy.get('heldout_examples', '?')} examples)")
    return figure


def _latency_bars(report: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{bar label: {batch key: (p50_ms, p90_ms)}} per EP, plus the fp32 baseline when a speed-up gate measured one;
    batches without a p50 are left out."""
    sources = dict(report.get("latency") or {})
    if report.get("baseline_latency"):
        sources["cpu\nfp32 baseline"] = report["baseline_latency"]
    bars = {}
    for label, measured in sources.items():
        bars[label] = {}
        for key, stats in measured.items():
            if key.startswith("batch") and isinstance(stats, dict) and not math.isnan(_finite(stats.get("p50_ms"))):
                bars[label][key] = (float(stats["p50_ms"]), _finite(stats.get("p90_ms")))
    return bars


def _decode_bars(report: dict) -> dict[str, float]:
    """Decoders with a KV cache: {label: decode tokens/s}, the uncompressed input beside the artifact per EP."""
    bars = {}
    for provider, generation in (report.get("generation") or {}).items():
        for name, label in (("input", "input"), ("artifact", "artifact")):
            value = _finite((generation.get(name) or {}).get("decode_tokens_per_s"))
            if not math.isnan(value):
                bars[f"{provider}\n{label}"] = value
    return bars


def _decode_panel(ax, bars: dict[str, float]) -> None:
    positions = range(len(bars))
    ax.bar(positions, list(bars.values()), width=0.5,
           color=["0.6" if label.endswith("input") else "C2" for label in bars])
    for x, value in zip(positions, bars.values()):
        ax.annotate(f"{value:.3g}", (x, value), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(list(positions), list(bars), fontsize=9)
    ax.set_xlim(-0.8, len(bars) - 0.2)
    ax.set_title("generation (KV cache)")
    ax.set_ylabel("decode tokens/s (higher is better)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def latency_figure(report: dict) -> Figure | None:
    """One panel per batch size: p50 latency per EP as a bar, p90 as the whisker above it; for a decoder with a
    KV cache, one more: decode tokens/s of the artifact beside the uncompressed input's."""
    bars, decode = _latency_bars(report), _decode_bars(report)
    batches = sorted({key for stats in bars.values() for key in stats},
                     key=lambda key: int(key[5:]) if key[5:].isdigit() else 0)
    if not batches:
        return None
    panels = len(batches) + bool(decode)
    figure = Figure(figsize=(3.2 * panels + 1.5, 4.5), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if decode:
        _decode_panel(axes[-1], decode)
    for ax, batch in zip(axes, batches):
        measured = {label: stats[batch] for label, stats in bars.items() if batch in stats}
        labels = list(measured)
        p50 = [p50 for p50, _ in measured.values()]
        whisker = [0.0 if math.isnan(p90) else max(p90 - p50, 0.0) for p50, p90 in measured.values()]
        positions = range(len(labels))
        ax.bar(positions, p50, yerr=[[0] * len(p50), whisker], capsize=6, width=0.5,
               color=[f"C{list(bars).index(label)}" for label in labels])  # one colour per EP in every panel
        ax.set_xlim(-0.8, len(labels) - 0.2)
        for x, value, extra in zip(positions, p50, whisker):
            ax.annotate(f"{value:.3g}", (x, value + extra), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=8)
        ax.set_xticks(list(positions), labels, fontsize=9)
        ax.set_title(f"batch {batch[5:]}")
        ax.set_ylabel("latency p50 (ms), whisker: p90")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{report['model']['name']}: ONNX Runtime latency per execution provider")
    return figure


# file name -> (renderer, alt text for report.md), in the order the report lists them
PLOTS = {"passes.png": (passes_figure, "params, total model bits and held-out metric after each pass"),
         "accuracy_vs_size.png": (accuracy_vs_size_figure, "held-out metric vs total model bits"),
         "latency.png": (latency_figure, "latency p50 and p90 per execution provider and batch size; decode "
                                        "tokens/s beside the uncompressed input's")}

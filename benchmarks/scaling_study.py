"""The k-bit scaling study (issue 15): the eight claims of Dettmers & Zettlemoyer 2023 on the fam-* family and
SmolLM2, each claim measured on the smallest grid that can answer it (docs/scaling.md, "## The study").

Every configuration is one real pipeline run (compressor.scaling.measure_job: quantize, QDQ export, perplexity
scored in ONNX Runtime on the artifact, total model bits from the report), one thread per process (processes share the
cores, none spins an idle thread pool). Rows are cached one file per run under WORK/<member>/el<N>/, so a rerun
measures only what is missing; `report` turns the cached rows into benchmarks/results/study/*.json|md|png.

    # what the committed results came from: the family on the lent machine's 16 CPU cores, 15 processes
    # (--shard 0/15 .. 14/15), COMPRESSOR_CACHE holding the held-out split and the cached members
    python benchmarks/scaling_study.py measure --claims 1,5,8,3,4,6 --eval-limit 512 \
        --members fam-0.1m,fam-0.3m,fam-0.9m,fam-2.5m,fam-8m --shard 0/15
    python benchmarks/scaling_study.py measure --claims noise --eval-limit 400   # and 450: other window sets
    python benchmarks/scaling_study.py measure --claims smol --eval-limit 32 --members smollm2 --shard 0/2
    python benchmarks/scaling_study.py report --eval-limit 512 --smol-eval-limit 32
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

WORK = Path(os.environ.get("STUDY_WORK", "/work/scratch/study"))  # rows and artifacts; another folder on another machine
RESULTS = Path(__file__).resolve().parent / "results" / "study"
SMOLLM2 = str(Path.home() / ".cache/compressor/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f")
MEMBERS = ("fam-0.1m", "fam-0.3m", "fam-0.9m", "fam-2.5m", "fam-8m")


@dataclass(frozen=True)
class StudyConfig:
    """What compressor.scaling.measure_job reads from a sweep configuration, with free-form quantize overrides
    (exponent bits, asymmetric int) that `compress scaling` has no option for."""
    label: str
    overrides: tuple[str, ...]
    dtype: str | None = None
    bits: int | None = None
    block_size: int | None = None
    budget: float | None = None
    recipe: str = "fp32"


def uniform(dtype: str, bits: int, block: int, *extra: str, label: str | None = None) -> StudyConfig:
    name = label or f"{dtype}{bits}-{'channel' if block == 0 else f'B{block}'}"
    return StudyConfig(name, (f"quantize.dtype={dtype}", f"quantize.bits={bits}", f"quantize.block_size={block}")
                       + extra, dtype, bits, block)


def claim_configs(claim: str) -> list[StudyConfig]:
    """The minimum grid per claim (configurations shared between claims are measured once, by label)."""
    if claim == "1":  # bit-optimal k per budget and parallel curves (claims 1, 2): int, k 3..8, B64
        return [uniform("int", k, 64) for k in (3, 4, 5, 6, 8)]
    if claim == "3":  # at 6-8 bits no method matters: the dtype spread at k 6 and 8
        return [uniform(d, k, 64) for d in ("int", "nf", "float", "quantile") for k in (6, 8)]
    if claim == "4":  # block size at 4 bits
        return [uniform("int", 4, b) for b in (32, 64, 128, 256, 512, 1024, 0)]
    if claim == "5":  # data types at 3-5 bits
        return [uniform(d, k, 64) for d in ("int", "nf", "float", "quantile") for k in (3, 4, 5)]
    if claim == "6":  # float exponent bits E = 1..k-1 at k 3, 4, 5 (a float of k bits has 1 sign bit)
        return [uniform("float", k, 64, f"quantize.exponent_bits={e}", label=f"float{k}-E{e}-B64")
                for k in (3, 4, 5) for e in range(1, k)]
    if claim == "8":  # distribution centering: asymmetric (min-max, zero point) vs symmetric absmax int, with 2^k - 1
        # levels and with all 2^k (full_range: the asymmetric code uses all 2^k, so this separates level count from centering)
        return [uniform("int", k, 64, "quantize.symmetric=false", label=f"int{k}-asym-B64") for k in (3, 4, 5)] \
            + [uniform("int", k, 64) for k in (3, 4, 5)] \
            + [uniform("int", k, 64, "quantize.full_range=true", label=f"int{k}-full-B64") for k in (3, 4, 5)]
    if claim == "noise":  # the same int4 run on a second, nearly disjoint set of held-out windows (see --eval-limit)
        return [uniform("int", 4, 64)]
    if claim == "smol":  # SmolLM2: a handful of runs (minutes each)
        return [uniform("int", 3, 64), uniform("int", 4, 64), uniform("int", 5, 64), uniform("nf", 4, 64),
                uniform("int", 4, 64, "quantize.symmetric=false", label="int4-asym-B64"),
                uniform("int", 4, 64, "quantize.full_range=true", label="int4-full-B64")]
    raise SystemExit(f"unknown claim {claim!r}")


def checkpoint_path(member: str) -> str:
    return SMOLLM2 if member == "smollm2" else member


def row_path(member: str, eval_limit: int, label: str) -> Path:
    return WORK / member / f"el{eval_limit}" / f"{label}.json"


def measure(members: list[str], claims: list[str], eval_limit: int, shard: tuple[int, int] = (0, 1)) -> None:
    """Measure what has no cached row; shard (i, n): only every n-th job from the i-th (n processes, one core each)."""
    import torch

    from compressor.ort_runtime import set_default_threads
    from compressor.scaling import Job, Settings, measure_job

    torch.set_num_threads(1)  # study processes share the cores; one thread each wastes nothing on spinning
    set_default_threads(1)
    # claim by claim across the members, so that an interrupted study has whole claims rather than whole members
    # the input's metric at this eval limit, from any finished row (another shard's too): measured once per member
    references = {m: next((r["reference_metrics"] for r in load_rows(m, eval_limit).values()), None) for m in members}
    jobs = [(m, c) for claim in claims for m in members for c in claim_configs(claim)]
    jobs = list({(m, c.label): (m, c) for m, c in jobs}.values())[shard[0]::shard[1]]
    for member, config in jobs:
        path = row_path(member, eval_limit, config.label)
        if path.exists():
            references[member] = references.get(member) or json.loads(path.read_text())["reference_metrics"]
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        job = Job(checkpoint_path(member), config, str(path.with_suffix("")), Settings(eval_limit, 0),
                  references.get(member), "study")
        row = measure_job(job)
        row["eval_limit"] = eval_limit
        references[member] = references.get(member) or row.get("reference_metrics")
        path.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{time.strftime('%H:%M:%S')} {member} el{eval_limit} {config.label}: "
              f"{row.get('metric', row.get('reason'))} ({row['seconds']:.0f} s)", flush=True)


def load_rows(member: str, eval_limit: int) -> dict[str, dict]:
    folder = WORK / member / f"el{eval_limit}"
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}
    return {k: r for k, r in rows.items() if r.get("status") == "ok"}


def linear_shapes(member: str) -> list[tuple[int, int]]:
    """The (out, in) shapes of the nn.Linear weights the quantize pass takes (all of them: targets re:.*), from the
    model skeleton (no weights read): the sweep's result rows do not carry them."""
    import torch.nn as nn

    from compressor.inputs import adapter_for

    path, adapter = adapter_for(Path(checkpoint_path(member)))
    model = adapter.skeleton(path)
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


def paper_bits(row: dict, shapes: list[tuple[int, int]]) -> int | None:
    """Total model bits as the paper counts them (one 16-bit absmax per block, unquantized params at 16 bits) for a
    symmetric block-wise int run; None for others (codebooks and zero points are counted differently)."""
    if row["dtype"] != "int" or "asym" in row["label"] or not row["block_size"].startswith("B"):
        return None
    block = int(row["block_size"][1:])
    quantized = sum(o * i for o, i in shapes)
    constants = sum(o * math.ceil(i / block) for o, i in shapes)
    return quantized * row["bits"] + 16 * constants + 16 * (row["params"] - quantized)


def table(members: list[str], eval_limit: int) -> dict[str, dict]:
    """member -> {params, fp32, rows: label -> the numbers the study uses}."""
    out = {}
    for member in members:
        rows = load_rows(member, eval_limit)
        if not rows:
            continue
        first = next(iter(rows.values()))
        entries, shapes = {}, linear_shapes(member)
        for label, row in rows.items():
            entries[label] = {"total_model_bits": row["total_model_bits"], "bits_per_param": row["bits_per_param"],
                              "paper_total_bits": paper_bits(row, shapes), "ppl_ort": row["metric"],
                              "ppl_torch": row["metric_torch"], "seconds": round(row["seconds"], 1)}
        quantized = sum(o * i for o, i in shapes)
        out[member] = {"params": first["params"], "quantized_share": quantized / first["params"], "fp32_ppl": first["reference_metrics"]["perplexity"],
                       "fp32_total_bits": 32 * first["params"], "paper_fp16_total_bits": 16 * first["params"],
                       "eval_limit": eval_limit, "runs": entries}
    return out


def dln(entry: dict, fp32: float) -> float:
    """ln(ppl / ppl_fp32): the degradation, comparable across members of different perplexity."""
    return math.log(entry["ppl_ort"] / fp32)


def best_k_per_budget(data: dict, key: str, ks=(3, 4, 5, 6, 8, 16), suffix: str = "-B64") -> list[dict]:
    """Claim 1: for budgets spanning the family, each k's curve (members' (log total bits, ppl-ratio to the
    largest member's fp32)) interpolated; the bit-optimal k is the lowest curve at that budget."""
    curves = {}
    for k in ks:
        points = []
        for member, d in data.items():
            if k == 16:  # the unquantized model, counted as the paper does (16 bits) or as our fp32 (32)
                bits = d["paper_fp16_total_bits"] if key == "paper_total_bits" else d["fp32_total_bits"]
                points.append((math.log2(bits), math.log(d["fp32_ppl"])))
            elif f"int{k}{suffix}" in d["runs"] and d["runs"][f"int{k}{suffix}"][key]:
                e = d["runs"][f"int{k}{suffix}"]
                points.append((math.log2(e[key]), math.log(e["ppl_ort"])))
        curves[k] = sorted(points)
    lo = max(c[0][0] for c in curves.values())
    hi = min(c[-1][0] for c in curves.values())
    result = []
    for i in range(7):
        x = lo + (hi - lo) * i / 6
        values = {k: _interp(c, x) for k, c in curves.items()}
        best = min(values, key=values.get)
        result.append({"total_bits": 2 ** x, "best_k": best,
                       "ppl_by_k": {str(k): round(math.exp(v), 4) for k, v in values.items()}})
    return result


def _interp(points, x):
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.inf


def write_report(members: list[str], eval_limit: int, smol_eval_limit: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = table(members, eval_limit)
    # the noise: int4-B64 and fp32 on two more window sets (400 and 450 windows, spread evenly, so mostly other windows)
    noise = {str(n): table(members, n) for n in (400, 450) if n != eval_limit}
    smol = table(["smollm2"], smol_eval_limit)
    summary = {"eval_limit": eval_limit, "family": data, "other_window_sets": noise, "smollm2": smol,
               "claim1_best_k": {"report_count": best_k_per_budget(data, "total_model_bits"),
                                 "paper_count": best_k_per_budget(data, "paper_total_bits"),
                                 # all 2^k levels (full_range) at k 3..5, as report.json counts bits
                                 "report_count_full_range": best_k_per_budget(data, "total_model_bits", (3, 4, 5, 16),
                                                                              "-full-B64")}}
    (RESULTS / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    colors = dict(zip(members, plt.cm.viridis([i / max(1, len(members) - 1) for i in range(len(members))])))

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(RESULTS / name, dpi=80)
        plt.close(fig)

    # claim 1: ppl vs total model bits, one line per k, both bit counts
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "total_model_bits", "as report.json counts (fp32 scales, fp32 rest)"),
                           (axes[1], "paper_total_bits", "as the paper counts (16-bit scales, 16-bit rest)")):
        for k in (3, 4, 5, 6, 8):
            pts = sorted((d["runs"][f"int{k}-B64"][key], d["runs"][f"int{k}-B64"]["ppl_ort"])
                         for d in data.values() if f"int{k}-B64" in d["runs"])
            ax.plot(*zip(*pts), "o-", label=f"int{k}-B64")
        fp = sorted((d["fp32_total_bits"] if key == "total_model_bits" else d["paper_fp16_total_bits"], d["fp32_ppl"])
                    for d in data.values())
        ax.plot(*zip(*fp), "k^--", label="unquantized (32 / 16 bit)")
        ax.set_xscale("log"), ax.set_ylim(top=min(12, ax.get_ylim()[1]))
        ax.set_xlabel("total model bits"), ax.set_ylabel(f"held-out ppl/byte (ORT, {eval_limit} windows)")
        ax.set_title(title, fontsize=9), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    save(fig, "claim1_bits.png")

    # claim 2: degradation per k vs params (parallel curves = constant offset in ln ppl)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in (3, 4, 5, 6, 8):
        pts = [(d["params"], dln(d["runs"][f"int{k}-B64"], d["fp32_ppl"])) for d in data.values()
               if f"int{k}-B64" in d["runs"]]
        ax.plot(*zip(*sorted(pts)), "o-", label=f"int{k}-B64")
    ax.set_xscale("log"), ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("params"), ax.set_ylabel("ln(ppl / ppl fp32)"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    save(fig, "claim2_parallel.png")

    def per_member_plot(name, xs, label_of, xlabel, series, xticklabels=None):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for s_name, style in series:
            for member, d in data.items():
                pts = [(i, dln(d["runs"][label_of(x, s_name)], d["fp32_ppl"])) for i, x in enumerate(xs)
                       if label_of(x, s_name) in d["runs"]]
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[member],
                            label=f"{member} {s_name}".strip())
        ax.set_xticks(range(len(xs)), xticklabels or [str(x) for x in xs])
        ax.set_yscale("symlog", linthresh=1e-3)  # degradations span 1e-4 .. 0.6
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel), ax.set_ylabel("ln(ppl / ppl fp32)"), ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        plt.setp(ax.get_xticklabels(), rotation=45, fontsize=7)
        save(fig, name)

    dtypes = ("int", "nf", "float", "quantile")
    per_member_plot("claim3_dtypes_6_8.png", [f"{d}{k}" for k in (6, 8) for d in dtypes],
                    lambda x, s: f"{x}-B64", "data type, k (B64)", [("", "o")])
    blocks = (32, 64, 128, 256, 512, 1024, 0)
    per_member_plot("claim4_blocks.png", blocks, lambda b, s: f"int4-{'channel' if b == 0 else f'B{b}'}",
                    "block size B (int4)", [("", "o-")], [str(b) if b else "channel" for b in blocks])
    per_member_plot("claim5_dtypes.png", [f"{d}{k}" for k in (3, 4, 5) for d in dtypes],
                    lambda x, s: f"{x}-B64", "data type, k (B64)", [("", "o")])
    per_member_plot("claim6_exponent.png", [f"{k}-E{e}" for k in (3, 4, 5) for e in range(1, k)],
                    lambda x, s: f"float{x}-B64", "float k - exponent bits (B64)", [("", "o")])
    per_member_plot("claim8_centering.png", (3, 4, 5), lambda k, s: f"int{k}{s}-B64", "k (B64)",
                    [("", "o-"), ("-full", "^:"), ("-asym", "s--")])
    write_markdown(summary)


def write_markdown(summary: dict) -> None:
    """study.md: every number the docs cite, per claim."""
    data, el = summary["family"], summary["eval_limit"]
    lines = ["# k-bit scaling study: the numbers (docs/scaling.md, `## The study`)", "",
             f"Held-out perplexity per byte through ONNX Runtime CPU (onnxruntime 1.30.0 on the lent machine's cores for the "
             f"family, 1.32.0 for SmolLM2) on {el} windows of 128 bytes spread over the "
             "whole held-out split; Δ = ln(ppl / ppl fp32). bits/param as report.json counts them (fp32 scales, "
             "unquantized params at 32 bits). Generated by `python benchmarks/scaling_study.py report`.", ""]
    sets = summary["other_window_sets"]
    lines += ["## Reference and noise (the same runs on other window sets)", "",
              "| member | params | quantized | fp32 ppl | int4-B64 ppl | " + " | ".join(
                  f"Δ int4, {n} w" for n in [el, *sets]) + " | spread of Δ | ORT − torch ppl, int4 |",
              "|---|---:|---:|---:|---:|" + "---:|" * (len(sets) + 3)]
    for member, d in data.items():
        e = d["runs"]["int4-B64"]
        deltas = [dln(e, d["fp32_ppl"])] + [dln(t[member]["runs"]["int4-B64"], t[member]["fp32_ppl"])
                                            for t in sets.values() if member in t]
        lines.append(f"| {member} | {d['params']:,} | {d['quantized_share']:.1%} | {d['fp32_ppl']:.4f} | "
                     f"{e['ppl_ort']:.4f} | " + " | ".join(f"{x:.4f}" for x in deltas) +
                     f" | {max(deltas) - min(deltas):.4f} | {e['ppl_ort'] - e['ppl_torch']:+.4f} |")
    lines += ["", "## Every run", "", "| member | run | bits/param | total model bits | paper-count bits | ppl ORT | Δ |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for member, d in data.items():
        for label, e in sorted(d["runs"].items()):
            paper = f"{e['paper_total_bits']:,}" if e["paper_total_bits"] else ""
            lines.append(f"| {member} | {label} | {e['bits_per_param']:.3f} | {e['total_model_bits']:,} | {paper} | "
                         f"{e['ppl_ort']:.4f} | {dln(e, d['fp32_ppl']):.4f} |")
    lines += ["", "## Claim 1: bit-optimal k per total-bit budget (int, B64; interpolated in log bits between members)", ""]
    for name, rows in summary["claim1_best_k"].items():
        lines += [f"{name}:", "", "| total bits | best k | " + " | ".join(f"ppl k={k}" for k in rows[0]["ppl_by_k"]) + " |",
                  "|---:|---:|" + "---:|" * len(rows[0]["ppl_by_k"])]
        for r in rows:
            lines.append(f"| {r['total_bits']:,.0f} | {r['best_k']} | " +
                         " | ".join("-" if not math.isfinite(v) else f"{v:.3f}" for v in r["ppl_by_k"].values()) + " |")
        lines.append("")
    for member, d in summary["smollm2"].items():
        lines += [f"## SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), {d['eval_limit']} windows", "",
                  f"fp32 ppl/token {d['fp32_ppl']:.4f}, {d['params']:,} params", "",
                  "| run | bits/param | ppl ORT | ppl torch | Δ | seconds |", "|---|---:|---:|---:|---:|---:|"]
        for label, e in sorted(d["runs"].items()):
            lines.append(f"| {label} | {e['bits_per_param']:.3f} | {e['ppl_ort']:.4f} | {e['ppl_torch']:.4f} | "
                         f"{dln(e, d['fp32_ppl']):.4f} | {e['seconds']:.0f} |")
    (RESULTS / "study.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("measure", "report"))
    parser.add_argument("--members", default=",".join(MEMBERS))
    parser.add_argument("--claims", default="1,3,4,5,6,8,noise")
    parser.add_argument("--eval-limit", type=int, default=512)
    parser.add_argument("--shard", default="0/1", help="i/n: this process's share of the jobs")
    parser.add_argument("--smol-eval-limit", type=int, default=32)
    args = parser.parse_args()
    if args.step == "measure":
        measure(args.members.split(","), args.claims.split(","), args.eval_limit,
                tuple(int(x) for x in args.shard.split("/")))
    else:
        write_report(args.members.split(","), args.eval_limit, args.smol_eval_limit)

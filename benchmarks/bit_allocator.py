"""The bit-budget allocator (quantize.budget_bits_per_param) against uniform k-bit configurations, on held-out
data through ONNX Runtime: for each model, uniform int-full / nf runs at k = 3, 4 over block sizes, then allocator
runs at budgets between uniform points and at exactly a uniform point's bits/param. Every number is read from the
report.json of a `compress run` (the int4 recipe plus --set overrides, embedding tables kept fp32 in every run:
`--set quantize.embedding_bits=`): perplexity through ONNX Runtime CPU and total model bits as the report counts
them (unquantized params at 32 bits).

    python benchmarks/bit_allocator.py [--models gpt-s,gpt-m,gpt-l,fam-0.9m,fam-2.5m,fam-8m,smollm2]
        [--uniform-only] [--runs DIR]

Runs are cached in --runs (default /work/scratch/alloc/bench): a finished run is not measured again.
Writes benchmarks/results/bit_allocator.json and bit_allocator.md.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SMOLLM2 = Path.home() / ".cache/compressor/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f"
GPT_UNIFORM = {f"int{k}-{'channel' if b == 0 else f'B{b}'}-full": {"bits": k, "block_size": b}
               for k, b in ((3, 64), (4, 64), (4, 128), (3, 32), (3, 128), (3, 0), (4, 32), (4, 0))}  # anchors first
GPT_UNIFORM.update({f"nf{k}-B64": {"dtype": "nf", "bits": k, "block_size": 64} for k in (3, 4)})
SMOL_UNIFORM = {name: GPT_UNIFORM[name] for name in ("int3-B64-full", "int4-B64-full", "int4-B128-full")}
# allocator budgets, bits/param, from the uniform runs: (name, uniform point A, uniform point B, weight of B)
BUDGETS = (("mid int3-B64 / int4-B64", "int3-B64-full", "int4-B64-full", 0.5),
           ("= int4-B128", "int4-B128-full", None, 0.0),
           ("= int4-B64", "int4-B64-full", None, 0.0))
# model -> (checkpoint, held-out windows scored, uniform configurations, extra --set for every run, budgets);
# SmolLM2 runs take ~15 minutes each on the shared 2-core machine: two budgets there
MODELS = {"gpt-s": ("gpt-s", 300, GPT_UNIFORM, {}, BUDGETS), "gpt-m": ("gpt-m", 300, GPT_UNIFORM, {}, BUDGETS),
          "gpt-l": ("gpt-l", 300, GPT_UNIFORM, {}, BUDGETS),
          "smollm2": (str(SMOLLM2), 32, SMOL_UNIFORM, {"calibration_samples": 32}, BUDGETS[1:]),
          # family members (docs/scaling.md; trained on the text corpus, resolved from the family cache)
          **{name: (name, 300, GPT_UNIFORM, {}, BUDGETS) for name in ("fam-0.9m", "fam-2.5m", "fam-8m")}}
PINNED = {"embedding_bits": ""}


def compress(checkpoint: str, out: Path, fields: dict, eval_limit: int, cached_only: bool = False) -> dict | None:
    """One `compress run` (cached: a folder with a report.json is read, not run again; None when `cached_only`
    and it has not run)."""
    report = out / "report.json"
    if not report.exists() and cached_only:
        return None
    if not report.exists():
        # embeddings stay fp32 as in the committed int4 preset, whatever the preset says while it changes
        sets = [arg for key, value in {**PINNED, **fields}.items() for arg in ("--set", f"quantize.{key}={value}")]
        command = ["compress", "run", checkpoint, "--out", str(out), "--recipe", "int4", *sets, "--eval-limit",
                   str(eval_limit), "--bench-runs", "1", "--quiet", "--force"]
        started = time.time()
        # one intra-op thread: on a shared 2-core machine torch's spinning threads make small ops 100x slower
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode == 2 and "in use by another compress run" in done.stderr:
            return None  # another invocation of this script is making it
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        print(f"  {out.name}: {time.time() - started:.0f} s", file=sys.stderr)
    data = json.loads(report.read_text())
    row = {"perplexity": data["accuracy"]["onnxruntime"]["cpu"], "perplexity_torch": data["accuracy"]["torch"],
           "total_model_bits": data["total_model_bits"], "bits_per_param": data["bits_per_param"],
           "params": data["model"]["params"], "fp32_perplexity": data["accuracy"]["reference"]}
    quantize = next(p for p in data["passes"] if p["name"] == "quantize")
    if "allocation" in quantize:
        row["allocation"] = quantize["allocation"]
    return row


def measure(model: str, runs: Path, uniform_only: bool, cached_uniform: bool, skip: tuple[str, ...] = (),
            cached_only: bool = False) -> dict:
    checkpoint, eval_limit, uniform, extra, budgets = MODELS[model]
    uniform = {name: fields for name, fields in uniform.items() if name not in skip}
    result = {"model": model, "eval_limit": eval_limit, "uniform": {}, "allocator": []}
    for name, fields in uniform.items():
        row = compress(checkpoint, runs / model / name, {**fields, **extra}, eval_limit,
                       cached_uniform or cached_only)
        if row is not None:
            result["uniform"][name] = row
    result["uniform_not_measured"] = [name for name in uniform if name not in result["uniform"]]
    if uniform_only:
        return result
    for label, a, b, weight in budgets:
        if a not in result["uniform"] or (b is not None and b not in result["uniform"]):
            continue  # its uniform points were not measured (--cached-only)
        low = result["uniform"][a]["bits_per_param"]
        budget = low if b is None else (1 - weight) * low + weight * result["uniform"][b]["bits_per_param"]
        budget = float(f"{budget:.6f}") if b is not None else float(f"{budget:.10f}")
        row = compress(checkpoint, runs / model / f"budget-{budget:.6f}",
                       {"budget_bits_per_param": budget, **extra}, eval_limit, cached_only)
        if row is None:
            result.setdefault("budgets_not_measured", []).append(label)
            continue
        # every uniform run at no more bits than the budget (a budget set to a uniform point's bits/param, rounded,
        # can leave the allocation a few bits below that point: the point still counts)
        best = min((r["perplexity"], name) for name, r in result["uniform"].items()
                   if r["total_model_bits"] <= max(row["total_model_bits"], budget * row["params"] + 1))
        result["allocator"].append({"budget": label, "budget_bits_per_param": budget, **row,
                                    "best_uniform_at_or_below": best[1], "best_uniform_perplexity": best[0],
                                    "beats_all_uniform": row["perplexity"] < best[0]})
    return result


SENSITIVITY_CANDIDATES = ("int2-B64-full", "int3-B64-full", "int4-B64-full", "nf3-B128", "int3-channel-full")


def _ranks(values):
    import torch
    return torch.tensor(values, dtype=torch.float64).argsort().argsort().double()


def sensitivity_check(model_name: str, samples: int = 64) -> dict:
    """How well each sensitivity measure ranks the measured KL (fp32 vs quantized next-token distributions) of
    quantizing one layer alone, over layers x SENSITIVITY_CANDIDATES: on the calibration windows (what the
    allocator sees) and on held-out windows. Spearman rank correlation; the allocator uses "fisher"."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compressor.inputs.checkpoint import load_checkpoint, resolve_sample
    from compressor.tasks import language_modeling
    from passes.bit_allocator import candidate_config, layer_statistics, predicted_kl
    from passes.quant_primitives import dequantize, relative_mse
    from passes.quantize import QuantizeConfig, quantize_weight

    torch.set_num_threads(1)
    checkpoint = load_checkpoint(resolve_sample(Path(model_name)))
    model, config = checkpoint.model, checkpoint.config
    calibration = language_modeling.calibration_data(config, samples, 0)
    heldout = torch.from_numpy(language_modeling.heldout_data(config, samples)[:, :-1])
    data = {"calibration": calibration, "heldout": [(heldout[i:i + 16],) for i in range(0, len(heldout), 16)]}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    stats = layer_statistics(model, layers, calibration)
    with torch.no_grad():
        reference = {key: [torch.log_softmax(model(*b), -1) for b in batches] for key, batches in data.items()}
    measures = {"fisher": [], "output_error": [], "weight_mse": []}
    measured = {key: [] for key in data}
    base = QuantizeConfig(budget_bits_per_param=4.0)
    for (name, module), layer_stats in zip(layers, stats):
        weight = module.weight.detach().clone()
        for label in SENSITIVITY_CANDIDATES:
            approx = dequantize(quantize_weight(weight, candidate_config(base, label), layer_stats["H"]))
            delta = approx - weight
            measures["fisher"].append(predicted_kl(weight, approx, layer_stats))
            measures["output_error"].append(float(((delta @ layer_stats["H"].float()) * delta).sum()))
            measures["weight_mse"].append(relative_mse(weight, approx))
            module.weight.data = approx
            with torch.no_grad():
                for key, batches in data.items():
                    kl = [float((ref.exp() * (ref - torch.log_softmax(model(*b), -1))).sum(-1).mean())
                          for ref, b in zip(reference[key], batches)]
                    measured[key].append(sum(kl) / len(kl))
            module.weight.data = weight
    result = {"model": model_name, "pairs": len(measures["fisher"]), "candidates": list(SENSITIVITY_CANDIDATES)}
    for measure, values in measures.items():
        for key, kls in measured.items():
            result[f"spearman_{measure}_vs_{key}_kl"] = float(torch.corrcoef(torch.stack([_ranks(values),
                                                                                         _ranks(kls)]))[0, 1])
    ratio = torch.tensor(measures["fisher"]) / torch.tensor(measured["calibration"])
    result["fisher_over_measured_kl"] = {"median": float(ratio.median()), "p10": float(ratio.quantile(0.1)),
                                         "p90": float(ratio.quantile(0.9))}
    return result


def cached_sensitivity(model: str, runs: Path) -> dict:
    path = runs / f"sensitivity-{model}.json"
    if not path.exists():
        runs.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sensitivity_check(model), indent=2))
    return json.loads(path.read_text())


def markdown(results: list[dict], sensitivity: list[dict] = ()) -> str:
    lines = ["# Bit-budget allocator vs uniform k-bit configurations", "",
             "Held-out perplexity per token (bytes for the GPT samples) through ONNX Runtime CPU, first N held-out "
             "windows; bits/param = total model bits / params as report.json counts them (codes, fp32 scales, "
             "zero points, codebooks; unquantized params at 32 bits). Every run: `--recipe int4 --set "
             "quantize.embedding_bits=` (embedding tables fp32); allocator: `--set quantize.budget_bits_per_param=X`, "
             "its default candidates, sensitivity from calibration (train) windows only. Generated by "
             "`python benchmarks/bit_allocator.py`.", ""]
    for result in results:
        if not result["uniform"]:
            lines += [f"## {result['model']}: not measured (no run finished in time on the shared machine)", ""]
            continue
        lines += [f"## {result['model']} (held-out windows: {result['eval_limit']})", "",
                  "| configuration | bits/param | total model bits | perplexity ORT |", "|---|---|---|---|"]
        rows = sorted([(r["bits_per_param"], name, r) for name, r in result["uniform"].items()]
                      + [(r["bits_per_param"], f"**allocator**, budget {r['budget_bits_per_param']:.4f} "
                          f"({r['budget']})", r) for r in result["allocator"]])
        fp32 = next(iter(result["uniform"].values()))["fp32_perplexity"]
        lines.append(f"| fp32 | 32.000 | | {fp32:.4f} |")
        for bpp, name, r in rows:
            lines.append(f"| {name} | {bpp:.4f} | {r['total_model_bits']:,} | {r['perplexity']:.4f} |")
        missing = [*result.get("uniform_not_measured", []), *(f"budget {label}" for label in
                                                               result.get("budgets_not_measured", []))]
        if missing:
            lines += ["", "Not measured (left out, or not finished in time on the shared machine): "
                      f"{', '.join(missing)}."]
        if result["allocator"]:
            lines += ["", "| budget | allocator perplexity | best uniform at ≤ the budget's bits | its perplexity | "
                      "beats all | "
                      "predicted KL (nats/token) | measured ln(ppl / ppl fp32) | allocation |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in result["allocator"]:
                allocation = r["allocation"]
                counts: dict[str, int] = {}
                for layer in allocation["layers"]:
                    counts[layer["candidate"]] = counts.get(layer["candidate"], 0) + 1
                mix = ", ".join(f"{n}x {c}" for c, n in sorted(counts.items(), key=lambda item: -item[1]))
                lines.append(f"| {r['budget_bits_per_param']:.4f} ({r['budget']}) | {r['perplexity']:.4f} | "
                             f"{r['best_uniform_at_or_below']} | {r['best_uniform_perplexity']:.4f} | "
                             f"{'yes' if r['beats_all_uniform'] else '**no**'} | {allocation['predicted_kl']:.4f} | "
                             f"{math.log(r['perplexity'] / r['fp32_perplexity']):.4f} | {mix} |")
        lines.append("")
    for check in sensitivity:
        lines += [f"## Sensitivity measures on {check['model']}: Spearman rank correlation with the measured KL of "
                  f"quantizing one layer alone ({check['pairs']} layer x candidate pairs: "
                  f"{', '.join(check['candidates'])})", "",
                  "| measure | vs KL on calibration windows | vs KL on held-out windows |", "|---|---|---|"]
        for measure, what in (("fisher", "Fisher-weighted output error (the allocator's)"),
                              ("output_error", "tr(ΔW H ΔWᵀ) alone"), ("weight_mse", "relative weight MSE")):
            lines.append(f"| {what} | {check[f'spearman_{measure}_vs_calibration_kl']:.3f} | "
                         f"{check[f'spearman_{measure}_vs_heldout_kl']:.3f} |")
        ratio = check["fisher_over_measured_kl"]
        lines += ["", f"Predicted / measured KL (calibration): median {ratio['median']:.2f}, 10-90% "
                  f"{ratio['p10']:.2f}-{ratio['p90']:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-s,gpt-m,gpt-l,smollm2")
    parser.add_argument("--runs", type=Path, default=Path("/work/scratch/alloc/bench"))
    parser.add_argument("--uniform-only", action="store_true")
    parser.add_argument("--cached-uniform", action="store_true", help="uniform rows only from runs already made")
    parser.add_argument("--skip", default="", help="uniform configurations not to run, e.g. int4-B32-full")
    parser.add_argument("--cached-only", action="store_true", help="tabulate the runs already made, run nothing")
    parser.add_argument("--sensitivity-models", default="gpt-s")
    args = parser.parse_args()
    results = []
    for model in args.models.split(","):
        print(f"{model}", file=sys.stderr)
        results.append(measure(model, args.runs, args.uniform_only, args.cached_uniform,
                               tuple(filter(None, args.skip.split(","))), args.cached_only))
    sensitivity = [] if args.uniform_only else [cached_sensitivity(m, args.runs)
                                                for m in args.sensitivity_models.split(",") if m]
    text = markdown(results, sensitivity)
    print(text)
    if not args.uniform_only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bit_allocator.json").write_text(json.dumps({"models": results, "sensitivity": sensitivity},
                                                               indent=2) + "\n")
        (RESULTS / "bit_allocator.md").write_text(text)


if __name__ == "__main__":
    main()

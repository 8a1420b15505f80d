"""Pareto front and best-per-budget of a sweep's result rows: pure functions (compressor.scaling makes the rows,
compressor.scaling_report draws them)."""
import math


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def pareto_front(runs: list[dict], higher_is_better: bool) -> list[dict]:
    """The measured runs no other run dominates (at most as many total model bits and a metric at least as good,
    one of the two strictly), by total model bits."""
    ok = [r for r in runs if r.get("status") == "ok" and math.isfinite(r["metric"])]
    front = []
    for run in ok:
        dominated = any(o["total_model_bits"] <= run["total_model_bits"]
                        and not _better(run["metric"], o["metric"], higher_is_better)
                        and (o["total_model_bits"] < run["total_model_bits"] or o["metric"] != run["metric"])
                        for o in ok if o is not run)
        if not dominated:
            front.append(run)
    return sorted(front, key=lambda r: (r["total_model_bits"], r["label"]))


def best_under(runs: list[dict], bits_per_param: float, higher_is_better: bool) -> dict | None:
    """The run with the best metric among those at <= bits_per_param (ties: fewer bits, then label)."""
    fits = [r for r in runs if r.get("status") == "ok" and math.isfinite(r["metric"])
            and r["bits_per_param"] <= bits_per_param]
    sign = -1 if higher_is_better else 1
    return min(fits, key=lambda r: (sign * r["metric"], r["total_model_bits"], r["label"]), default=None)


def best_per_budget(runs: list[dict], budgets, bits_values, higher_is_better: bool) -> list[dict]:
    """For each --budget and each distinct k of the grid: the best run at <= that many bits/param (or none)."""
    entries = [("budget", float(x)) for x in budgets] + [("bits", float(k)) for k in sorted(set(bits_values))]
    result = []
    for source, limit in entries:
        best = best_under(runs, limit, higher_is_better)
        result.append({"bits_per_param": limit, "from": source,
                       "best": None if best is None else {k: best[k] for k in SUMMARY_KEYS}})
    return result


SUMMARY_KEYS = ("label", "dtype", "bits", "block_size", "budget_bits_per_param", "total_model_bits", "bits_per_param",
                "metric")

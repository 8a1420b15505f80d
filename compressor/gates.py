"""Regression gates on a finished run: parity, accuracy recovery, speed-up. Misses exit 1 (report written)."""
from compressor.ort_runtime import headline_provider
from compressor.recipes import Gates


def evaluate_gates(gates: Gates, report: dict, baseline_latency: dict | None) -> dict:
    checks = []
    if gates.require_parity:
        agreement = all(a["passed"] for a in report["accuracy"]["agreement"].values())
        checks.append({"gate": "parity", "value": report["parity"]["max_rel"],
                       "threshold": report["parity"]["tolerance_max_rel"],
                       "passed": bool(report["parity"]["passed"] and agreement)})
    if gates.min_recovery is not None:
        accuracy = report["accuracy"]
        artifact = accuracy["onnxruntime"][headline_provider(accuracy["onnxruntime"])]
        ratio = artifact / accuracy["reference"] if accuracy["higher_is_better"] else accuracy["reference"] / artifact
        checks.append({"gate": "min_recovery", "value": ratio, "threshold": gates.min_recovery,
                       "passed": ratio >= gates.min_recovery})
    if gates.min_speedup is not None:
        latency = report["latency"]["cpu"]
        # the batch sizes both measured: one over the logits budget is run for neither (latency.<ep>.skipped_batches)
        measured = [b for b in latency if b.startswith("batch") and b in baseline_latency]
        speedup = min(baseline_latency[b]["p50_ms"] / latency[b]["p50_ms"] for b in measured)
        checks.append({"gate": "min_speedup", "value": speedup, "threshold": gates.min_speedup,
                       "passed": speedup >= gates.min_speedup})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}

"""`compress check ARTIFACT --baseline report.json`: re-measure an artifact's held-out accuracy under ONNX
Runtime and compare it with a baseline report, so regression tests can hold an artifact to its accuracy."""
import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from compressor.errors import UserError
from compressor.ort_runtime import create_session, logits_fn
from compressor.tasks import TASKS


@dataclass(frozen=True)
class CheckResult:
    metric: str
    baseline: float
    measured: float
    change: float  # relative for perplexity, absolute for exact match; positive = worse
    tolerance: float
    passed: bool

    def line(self) -> str:
        verdict = "ok" if self.passed else "REGRESSION"
        return (f"{verdict}: {self.metric} {self.measured:.4f} vs baseline {self.baseline:.4f} "
                f"(worse by {self.change:+.4g}, tolerance {self.tolerance})")


def _artifact_metadata(artifact: Path) -> dict:
    if not artifact.is_file():
        raise UserError(f"artifact not found: {artifact}")
    try:
        model = onnx.load(str(artifact), load_external_data=False)
    except Exception as exc:  # protobuf errors are long; the first line names the problem
        raise UserError(f"{artifact} is not a readable ONNX model ({str(exc).splitlines()[0][:120]})") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    if "compressor.family" not in metadata or "compressor.model_config" not in metadata:
        raise UserError(f"{artifact} was not written by `compress run` (no compressor metadata)")
    return metadata


def _baseline(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        accuracy = report["accuracy"]
        return {"metric": accuracy["metric"], "value": accuracy["onnxruntime"]["cpu"],
                "examples": accuracy["heldout_examples"]}
    except OSError as exc:
        raise UserError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a compress report.json with accuracy.onnxruntime.cpu") from None


def check_artifact(artifact: Path, baseline: Path, tolerance: float = 0.01) -> CheckResult:
    """tolerance: allowed worsening, relative for perplexity (0.01 = 1%), absolute for exact match."""
    metadata = _artifact_metadata(Path(artifact))
    reference = _baseline(baseline)
    task = TASKS[metadata["compressor.family"]]
    if task.METRIC != reference["metric"]:
        raise UserError(f"baseline measures {reference['metric']}, the artifact's task measures {task.METRIC}")
    data = task.heldout_data(json.loads(metadata["compressor.model_config"]), reference["examples"])
    if hasattr(task, "restore_state"):  # e.g. the sentiment probe fitted on the input model's embeddings
        if "compressor.task_state" not in metadata:
            raise UserError(f"{artifact} lacks compressor.task_state, which its task needs to score it")
        task.restore_state(data, json.loads(metadata["compressor.task_state"]))
    measured = task.evaluate(logits_fn(create_session(Path(artifact))), data)
    if task.HIGHER_IS_BETTER:
        change = reference["value"] - measured
    else:
        change = (measured - reference["value"]) / reference["value"]
    return CheckResult(task.METRIC, reference["value"], measured, change, tolerance, change <= tolerance)

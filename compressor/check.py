"""`compress check ARTIFACT --baseline report.json`: re-measure an artifact's held-out accuracy under ONNX
Runtime and compare it with a baseline report, so regression tests can hold an artifact to its accuracy.

Both inputs are files a user hands over, and either may have been edited: the baseline's figures are checked
for type and range, the artifact's compressor.* metadata as an ONNX input's is, before anything is measured."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import onnx

from compressor.atomic import sha256_file
from compressor.errors import UserError
from compressor.inputs.onnx import (check_external_data, check_graph_inputs, guarded_logits_fn, ort_session,
                                    read_task_metadata)
from compressor.onnx_file import data_path
from compressor.tasks import TASKS, worsening
from compressor.tasks.protocol import ReferenceTask, UnusableState
from exporters import metadata_keys
from passes.calibration import excerpt, first_line

MAX_REPORT_BYTES = 64 << 20  # a report.json is kilobytes; a larger file is not one
MAX_HELDOUT_EXAMPLES = 1_000_000  # more than any task's held-out split (seq2seq would generate that many)
# the metrics a baseline may name: what a valid value is, in words and as a test (finite numbers only)
METRIC_RANGES = {"perplexity": ("> 0", lambda v: v > 0), "exact_match": ("in [0, 1]", lambda v: 0 <= v <= 1),
                 "probe_accuracy": ("in [0, 1]", lambda v: 0 <= v <= 1)}


@dataclass(frozen=True)
class CheckResult:
    metric: str
    baseline: float
    measured: float
    change: float  # relative for perplexity, absolute for exact match; positive = worse
    tolerance: float
    passed: bool
    # the artifact is the very file the baseline report describes (its sha256); None when the report has none.
    # A different file is reported, not failed: holding a rebuilt artifact to an old baseline is the point.
    same_artifact: bool | None = None

    def line(self) -> str:
        verdict = "ok" if self.passed else "REGRESSION"
        other = " (a different artifact than the baseline's)" if self.same_artifact is False else ""
        return (f"{verdict}: {self.metric} {self.measured:.4f} vs baseline {self.baseline:.4f} "
                f"(worse by {self.change:+.4g}, tolerance {self.tolerance}){other}")


def _regular_file(path: Path, what: str) -> None:
    """A folder, a FIFO (reading it would wait forever) or a device is refused before it is opened."""
    try:
        if path.is_file():
            return
        exists = path.exists()
    except (OSError, ValueError):  # a name too long; a NUL byte
        exists = False
    text = str(path)
    shown = text if len(text) <= 160 and text.isprintable() else excerpt(text, 160)
    raise UserError(f"{what} {'is not a file' if exists else 'not found'}: {shown}")


def _artifact_metadata(artifact: Path) -> tuple[onnx.ModelProto, dict]:
    _regular_file(artifact, "artifact")
    try:
        model = onnx.load(str(artifact), load_external_data=False)
    except Exception as exc:  # protobuf errors are long; the first line names the problem
        raise UserError(f"{artifact} is not a readable ONNX model ({first_line(exc, 120)})") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    if metadata_keys.FAMILY not in metadata or metadata_keys.MODEL_CONFIG not in metadata:
        raise UserError(f"{artifact} was not written by `compress run` (no compressor metadata)")
    check_external_data(model, artifact.parent)  # ONNX Runtime would read whatever the locations name
    return model, metadata


def _get(mapping, *keys):
    """mapping[k1][k2]..., or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _baseline(path: Path) -> dict:
    path = Path(path)
    _regular_file(path, "baseline")
    not_a_report = f"{path} is not a compress report.json with accuracy.onnxruntime.cpu"
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise UserError(f"{not_a_report} ({path.stat().st_size:,} bytes)")
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int; deep nesting
        raise UserError(f"{not_a_report} (not valid JSON)") from None
    by_provider = _get(report, "accuracy", "onnxruntime")
    if not isinstance(by_provider, dict) or "cpu" not in by_provider or "metric" not in report["accuracy"]:
        raise UserError(not_a_report)
    metric, value = report["accuracy"]["metric"], by_provider["cpu"]
    examples = report["accuracy"].get("heldout_examples")
    if not isinstance(metric, str) or metric not in METRIC_RANGES:
        raise UserError(f"{path}: accuracy.metric {excerpt(metric)} is not a metric this version knows "
                        f"({', '.join(METRIC_RANGES)})")
    bounds, valid = METRIC_RANGES[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or not valid(value):
        raise UserError(f"{path}: accuracy.onnxruntime.cpu must be a finite {metric} {bounds}, not {excerpt(value)}")
    if isinstance(examples, bool) or not isinstance(examples, int) or not 1 <= examples <= MAX_HELDOUT_EXAMPLES:
        raise UserError(f"{path}: accuracy.heldout_examples must be an integer in 1..{MAX_HELDOUT_EXAMPLES:,}, not "
                        f"{excerpt(examples)}")
    sha256 = _get(report, "artifact", "sha256")
    data_sha256 = _get(report, "artifact", "external_data", "sha256")  # model.onnx.data's, where it has one
    return {"metric": metric, "value": float(value), "examples": examples,
            "sha256": sha256 if isinstance(sha256, str) else None,
            "data_sha256": data_sha256 if isinstance(data_sha256, str) else None}


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _task_state(artifact: Path, task: ReferenceTask, data, metadata: dict, session) -> None:
    """Restore what fit_reference learned (e.g. the sentiment probe) from the artifact's compressor.task_state."""
    if metadata_keys.TASK_STATE not in metadata:
        raise UserError(f"{artifact} lacks compressor.task_state, which its task needs to score it")
    try:
        state = json.loads(metadata[metadata_keys.TASK_STATE])
    except (ValueError, RecursionError):
        raise UserError(f"{artifact}: compressor.task_state is not valid JSON") from None
    if not isinstance(state, dict):
        raise UserError(f"{artifact}: compressor.task_state must be a JSON object, not {excerpt(state)}")
    width = session.get_outputs()[0].shape[-1]  # e.g. the embedding width, when the graph states it
    try:
        task.restore_state(data, state, width if isinstance(width, int) else None)
    except UnusableState as exc:
        raise UserError(f"{artifact}: compressor.task_state {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{artifact}: compressor.task_state does not hold what its task needs "
                        f"({type(exc).__name__}: {excerpt(str(exc), 80)})") from None


def check_artifact(artifact: Path, baseline: Path, tolerance: float = 0.01) -> CheckResult:
    """tolerance: allowed worsening, relative for perplexity (0.01 = 1%), absolute for exact match."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise UserError(f"--tolerance must be a finite number >= 0, not {excerpt(tolerance)}")
    artifact = Path(artifact)
    _, metadata = _artifact_metadata(artifact)
    reference = _baseline(baseline)
    family, config = read_task_metadata(metadata, artifact)
    task = TASKS[family]
    if task.METRIC != reference["metric"]:
        raise UserError(f"baseline measures {reference['metric']}, the artifact's task measures {task.METRIC}")
    session = ort_session(artifact, artifact)
    check_graph_inputs(session, task, artifact)
    data = task.heldout_data(config, reference["examples"])
    if len(data) != reference["examples"]:
        raise UserError(f"the baseline was scored on {reference['examples']:,} held-out examples; the artifact's task "
                        f"has {len(data):,}")
    if task.FITS_REFERENCE:
        _task_state(artifact, task, data, metadata, session)
    measured = task.evaluate(guarded_logits_fn(session, artifact), data)
    change = worsening(reference["value"], measured, task.HIGHER_IS_BETTER)
    # the same files: model.onnx and, with external data, model.onnx.data (its graph alone names no tensor value)
    same = None if reference["sha256"] is None else (
        sha256_file(artifact) == reference["sha256"]
        and (sha256_file(data_path(artifact)) if data_path(artifact).is_file() else None) == reference["data_sha256"])
    return CheckResult(task.METRIC, reference["value"], measured, change, tolerance, change <= tolerance, same)

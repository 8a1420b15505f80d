"""`compress run`: resolve the recipe, load a checkpoint, apply the passes, export to ONNX, validate, report."""
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from compressor import __version__
from compressor.checkpoint import load_checkpoint, model_skeleton, sha256_file
from compressor.atomic import atomic_write_text, removed_on_failure
from compressor.errors import UserError
from compressor.gates import evaluate_gates
from compressor.recipes import GRAPH_PASSES, check_recipe_fits, resolve_recipe
from compressor.report import SCHEMA_VERSION, environment, tool_record, write_reports
from compressor.hf_checkpoint import hf_model_skeleton, is_hf_checkpoint, load_hf_checkpoint
from compressor.onnx_input import is_onnx_input
from compressor.onnx_pipeline import run_onnx
from compressor.ort_runtime import check_providers
from compressor.tasks import TASKS, measure
from compressor.validate import BenchmarkSettings, Tolerances, run_benchmark, torch_logits_fn, validate
from exporters.onnx_export import export_onnx, finalize, save_onnx
from exporters.qdq import lower_to_qdq
from passes.fuse import fuse_onnx
from passes.heal import heal_model
from passes.lowrank import lowrank_model
from passes.model_bits import total_model_bits
from passes.prune import prune_model
from passes.quantize import quantize_model
from passes.structured_prune import structured_prune_model
from samples.registry import SAMPLES, SHIPPED_DIR, count_params

ARTIFACT_NAME = "model.onnx"
PASS_FUNCTIONS = {"prune": prune_model, "structured_prune": structured_prune_model, "lowrank": lowrank_model,
                  "heal": heal_model, "quantize": quantize_model}


@dataclass(frozen=True)
class RunOptions:
    recipe: str = "fp32"
    overrides: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("cpu",)
    eval_limit: int | None = None  # None: the whole held-out split
    seed: int = 0
    force: bool = False
    bench: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    progress: bool = True


def check_out_dir(out_dir: Path, force: bool) -> None:
    """What can be said of --out without touching it: run first, before minutes of loading."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if (out_dir / ARTIFACT_NAME).exists() and not force:
        raise UserError(f"{out_dir / ARTIFACT_NAME} already exists (pass --force to overwrite)")


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    check_out_dir(out_dir, force)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.partial"):  # left by a run killed mid-write (SIGKILL skips cleanup)
            stale.unlink()
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir}: {exc.strerror or exc}") from None


def resolve_checkpoint(source: Path) -> Path:
    """A path as given, or the name of a shipped sample (e.g. `gpt-s`) when no such path exists."""
    if not source.exists() and str(source) in SAMPLES and (SHIPPED_DIR / str(source)).is_dir():
        return SHIPPED_DIR / str(source)
    return source


def run(checkpoint_path: Path, out_dir: Path, options: RunOptions = RunOptions(), log=print) -> dict:
    recipe = resolve_recipe(options.recipe, options.overrides)  # a bad recipe fails before any model loads
    check_providers(options.providers)
    check_out_dir(Path(out_dir), options.force)
    checkpoint_path = resolve_checkpoint(Path(checkpoint_path))
    if is_onnx_input(checkpoint_path):
        return run_onnx(checkpoint_path, out_dir, recipe, options, log)
    if is_hf_checkpoint(checkpoint_path):
        skeleton = hf_model_skeleton(checkpoint_path)
        if skeleton is not None:
            check_recipe_fits(recipe, skeleton)  # shapes from config.json, before any weights
        checkpoint = load_hf_checkpoint(checkpoint_path, options.progress)
    else:
        check_recipe_fits(recipe, model_skeleton(checkpoint_path))  # shapes from config.json, before any weights
        checkpoint = load_checkpoint(checkpoint_path)
    prepare_out_dir(out_dir, options.force)
    task = TASKS[checkpoint.family]
    log(f"loaded {checkpoint.name} ({checkpoint.family}, {count_params(checkpoint.model):,} params) "
        f"from {checkpoint_path}; recipe {recipe.name}")

    heldout = task.heldout_data(checkpoint.config, options.eval_limit)
    reference_fn = torch_logits_fn(checkpoint.model, task.INPUT_NAMES)
    if hasattr(task, "fit_reference"):
        task.fit_reference(reference_fn, heldout, options.progress)
    reference_metrics = measure(task, reference_fn, heldout, options.progress)
    reference_accuracy = reference_metrics[task.METRIC]
    model = copy.deepcopy(checkpoint.model) if recipe.passes else checkpoint.model
    pass_records, accuracy = [], reference_accuracy
    for pass_name, config in recipe.passes:
        if pass_name in GRAPH_PASSES:  # rewrites the exported graph, below
            continue
        calibration = None
        if getattr(config, "needs_calibration", False):
            calibration = task.calibration_data(checkpoint.config, config.calibration_samples, options.seed)
        try:
            record = PASS_FUNCTIONS[pass_name](model, config, calibration, options.progress)
        except ValueError as exc:
            raise UserError(f"{pass_name}: {exc}") from None
        record.update(total_model_bits(model))
        metrics = measure(task, torch_logits_fn(model, task.INPUT_NAMES), heldout, options.progress)
        accuracy = metrics[task.METRIC]
        record.update(metrics)
        pass_records.append(record)
        log(f"{pass_name}: {record.get('label', '')} -> {task.METRIC} {accuracy:.4f} (torch), "
            f"{record['params']:,} params, {record['bits_per_param']:.3f} bits/param")

    artifact = out_dir / ARTIFACT_NAME
    metadata = {
        "compressor.version": __version__,
        "compressor.source": checkpoint.name,
        "compressor.source_sha256": checkpoint.weights_sha256,
        "compressor.recipe": json.dumps(recipe.to_dict(), sort_keys=True),
        "compressor.family": checkpoint.family,
        "compressor.model_config": json.dumps(checkpoint.config, sort_keys=True),
    }
    if hasattr(task, "task_state"):  # what `compress check` needs to score the artifact later (e.g. a probe)
        metadata["compressor.task_state"] = json.dumps(task.task_state(heldout), sort_keys=True)
    log(f"exporting to {artifact}")
    proto = export_onnx(model, task.parity_inputs(heldout), task.dynamic_axes(checkpoint.config), task.OUTPUT_NAME,
                        progress=options.progress)
    lowering = None
    if recipe.passes:
        proto, lowering = lower_to_qdq(proto, model)
    proto, pass_records = apply_graph_passes(proto, recipe, pass_records, total_model_bits(model), log)
    with removed_on_failure(artifact, out_dir / "recipe.yaml"):
        save_onnx(finalize(proto, metadata), artifact)
        atomic_write_text(out_dir / "recipe.yaml", recipe.to_yaml())

        quantized = bool(lowering and lowering["lowered"])
        log(f"validating on {len(heldout)} held-out examples with ONNX Runtime ({', '.join(options.providers)})")
        results = validate(model, task, checkpoint.config, artifact, heldout, list(options.providers),
                           Tolerances.for_artifact(quantized), options.bench, torch_accuracy=accuracy,
                           progress=options.progress)
        baseline_latency = None
        if recipe.gates.min_speedup is not None:
            baseline_latency = _fp32_latency(checkpoint.model, task, checkpoint.config, heldout, options.bench, log)
        model_record = {"name": checkpoint.name, "family": checkpoint.family, "params": count_params(model),
                        "input_params": count_params(checkpoint.model), "source": str(checkpoint_path),
                        "source_sha256": checkpoint.weights_sha256, "config": checkpoint.config}
        report = assemble_report(model_record, recipe, artifact, proto, lowering, total_model_bits(model),
                                 pass_records, reference_metrics, task.METRIC, results, baseline_latency)
        write_reports(out_dir, report)
    return report


def apply_graph_passes(proto, recipe, pass_records: list, bits: dict, log) -> tuple:
    """The recipe's ONNX -> ONNX passes (fuse) on the lowered graph; their records join the torch passes'."""
    for pass_name, config in recipe.passes:
        if pass_name == "fuse":
            proto, record = fuse_onnx(proto, config)
            record.update(bits)
            pass_records = [*pass_records, record]
            log(f"fuse: {record['label']} -> {record['fusions'] or 'nothing to fuse'}, "
                f"{record['nodes']['before']} -> {record['nodes']['after']} nodes")
    return proto, pass_records


def fill_graph_pass_metrics(report: dict) -> None:
    """Graph passes have no torch model to score: their entry takes the artifact's ONNX Runtime metric."""
    accuracy = report["accuracy"]
    measured = next(iter(accuracy["onnxruntime"].values()), None)
    for entry in report["passes"]:
        if entry["name"] in GRAPH_PASSES and measured is not None:
            entry[accuracy["metric"]] = measured
            entry["measured_by"] = "onnxruntime-" + next(iter(accuracy["onnxruntime"]))


def assemble_report(model_record: dict, recipe, artifact: Path, proto, lowering, bits: dict, pass_records: list,
                    reference_metrics: dict, metric: str, results: dict, baseline_latency: dict | None) -> dict:
    """report.json's content (docs/report-schema.md), gates evaluated."""
    accuracy_report = results.pop("accuracy")
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_record(),
        "model": model_record,
        "recipe": recipe.to_dict(),
        "artifact": {"path": str(artifact), "bytes": artifact.stat().st_size, "sha256": sha256_file(artifact),
                     "opset": max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")),
                     "ir_version": proto.ir_version, "lowering": lowering},
        "total_model_bits": bits["total_model_bits"],
        "bits_per_param": bits["bits_per_param"],
        "passes": pass_records,
        "accuracy": {"metric": accuracy_report.pop("metric"), "reference": reference_metrics[metric],
                     "reference_metrics": reference_metrics, **accuracy_report},
        **results,
        "baseline_latency": baseline_latency,
        "environment": environment(),
    }
    fill_graph_pass_metrics(report)
    report["gates"] = evaluate_gates(recipe.gates, report, baseline_latency)
    return report


def _fp32_latency(model, task, config: dict, heldout, bench: BenchmarkSettings, log) -> dict:
    """CPU latency of the uncompressed model exported as-is: the speed-up gate's denominator."""
    import tempfile

    log("measuring the fp32 baseline's latency for the speed-up gate")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "fp32.onnx"
        save_onnx(finalize(export_onnx(model, task.parity_inputs(heldout), task.dynamic_axes(config),
                                       task.OUTPUT_NAME), {}), path)
        measured = run_benchmark(path, task, config, "cpu", bench)
    return {k: v for k, v in measured.items() if k.startswith("batch")}

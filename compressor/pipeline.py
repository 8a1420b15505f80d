"""`compress run`, the one place that knows the order of the stages: recipe checks, input adapter, held-out
reference, torch passes, export, QDQ lowering, graph passes, artifact, validation, report."""
import gc
import json
import resource
import tempfile
from pathlib import Path

import onnx

from compressor.artifact import ARTIFACT_NAME, assemble_report, check_out_dir, locked_out_dir, prepare_out_dir, staged
from compressor.atomic import atomic_write_text
from compressor.onnx_file import save_onnx, serialized_if_one_file
from compressor.errors import UserError
from compressor.inputs import InputAdapter, Source, adapter_for
from compressor.ort_runtime import check_providers
from compressor.recipes import Recipe, check_recipe_fits, check_recipe_takes, resolve_recipe
from compressor.report import write_reports
from compressor.run_options import RunOptions
from compressor.streaming.run import run_streamed, streamed_store
from compressor.run_record import artifact_metadata, finite_outputs, side_files
from compressor.tasks import measure
from compressor.validate import Tolerances, run_benchmark, validate
from exporters import metadata_keys
from exporters.lowering import baseline_artifact, lower_artifact
from exporters.onnx_export import ExportError, finalize
from exporters.qdq import LoweringError
from passes.registry import GRAPH, PASSES, TORCH


def run(input_path: Path, out_dir: Path, options: RunOptions = RunOptions(), log=print,
        adapter: InputAdapter | None = None) -> dict:
    """`adapter`: one to read the input with instead of the one adapter_for picks (a sweep's, which loads the
    checkpoint once and hands each run a copy)."""
    recipe = options.recipe  # a bad recipe fails before any model loads
    if not isinstance(recipe, Recipe):
        recipe = resolve_recipe(recipe, options.overrides)
    elif options.overrides:
        raise UserError("overrides go with a preset or YAML recipe; a built Recipe holds its configs")
    check_providers(options.providers)
    if options.bench is None and recipe.gates.min_speedup is not None:
        raise UserError("gates.min_speedup needs the latency benchmark, which this run skips")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, options.force)
    path, found = adapter_for(Path(input_path))
    adapter = adapter or found
    check_recipe_takes(recipe, adapter)
    skeleton = adapter.skeleton(path)  # shapes from the config alone, before any weights
    if skeleton is not None:
        check_recipe_fits(recipe, skeleton)
    store = streamed_store(path, adapter.kind, skeleton, options)  # a decoder read and written layer by layer
    with locked_out_dir(out_dir):
        prepare_out_dir(out_dir, options.force)
        if store is not None:
            return run_streamed(store, path, out_dir, recipe, options, log)
        source = adapter.load(path, options.progress)
        if skeleton is None:
            check_recipe_fits(recipe, source.model)
        try:
            with tempfile.TemporaryDirectory(prefix="compress-") as scratch:
                return _compress(source, recipe, out_dir, options, log, Path(scratch))
        finally:
            source.model = None  # what the passes left of the model is not the caller's to keep


def _compress(source: Source, recipe: Recipe, out_dir: Path, options: RunOptions, log, scratch: Path) -> dict:
    task, model, progress = source.task, source.model, options.progress
    input_bits = source.bits(model, {})  # the input as given: fp32

    def bits_of(model, quantized: dict) -> dict:  # as the artifact stores it
        return source.bits(model, quantized, float_bits=recipe.export.float_bits)

    log(f"loaded {source.name} ({source.family}, {input_bits['params']:,} params) from {source.record['source']}; "
        f"recipe {recipe.name}")
    for note in source.notes + recipe.notes:
        log(note)
    heldout = task.heldout_data(source.config, options.eval_limit)
    if options.reference_metrics is not None and not task.FITS_REFERENCE:
        reference_metrics = dict(options.reference_metrics)
    else:
        reference_fn = finite_outputs(source.reference_fn or source.logits_fn(model, {}),
                                       f"{source.record['source']}: the model's outputs on the held-out data hold "
                                       f"NaN or Inf values (its forward pass overflows): nothing to compress")
        if task.FITS_REFERENCE:  # e.g. a probe trained on the input model's embeddings
            task.fit_reference(reference_fn, heldout, progress)
        reference_metrics = measure(task, reference_fn, heldout, progress)
        del reference_fn
    parity_batch = task.parity_inputs(heldout)
    baseline_latency, input_artifact = None, None
    if recipe.passes and (recipe.gates.min_speedup is not None or (source.generates and options.bench)):
        # the input model as exported, before the passes rewrite it: the speed-ups' denominator
        input_artifact = _export_input(source, parity_batch, scratch / "input.onnx", recipe.export.dtype, log)
    if recipe.gates.min_speedup is not None:
        measured = run_benchmark(input_artifact, source.task, source.config, "cpu", options.bench)
        baseline_latency = {k: v for k, v in measured.items() if k.startswith("batch")}

    quantized, pass_records, metrics = {}, [], reference_metrics
    for name, config in recipe.passes:
        if PASSES[name].rewrites != TORCH:
            continue
        calibration = None
        if config.needs_calibration:
            calibration = task.calibration_data(source.config, config.calibration_samples, options.seed)
        try:
            record = PASSES[name].run(model, config, calibration, progress)
        except ValueError as exc:
            raise UserError(f"{name}: {exc}") from None
        quantized.update(record.pop("quantized", {}))
        record.update(bits_of(model, quantized))
        metrics = measure(task, source.logits_fn(model, quantized), heldout, progress)
        record.update(metrics)
        pass_records.append(record)
        log(f"{name}: {record.get('label', '')} -> {task.METRIC} {metrics[task.METRIC]:.4f} (before export), "
            f"{record['params']:,} params, {record['bits_per_param']:.3f} bits/param")
    bits = bits_of(model, quantized)
    torch_passes = ", ".join(name for name, _ in recipe.passes if PASSES[name].rewrites == TORCH)
    not_finite = (f"{source.record['source']}: after {torch_passes} the model's outputs hold NaN or Inf values: "
                  f"refused before export (change the recipe)" if torch_passes else
                  f"{source.record['source']}: the model's outputs hold NaN or Inf values (its forward pass "
                  f"overflows): nothing to compress")
    reference_logits = finite_outputs(source.logits_fn(model, quantized), not_finite)(parity_batch)

    log(f"exporting to {out_dir / ARTIFACT_NAME}")
    graph_records = []

    def graph_passes(proto: onnx.ModelProto) -> onnx.ModelProto:
        proto, records = _graph_passes(proto, recipe, progress, log)
        graph_records.extend(records)
        return proto

    try:
        proto = source.export(model, parity_batch, progress)
        del model  # from here on the artifact and the logits above stand for it
        source.model = None
        gc.collect()  # Hugging Face modules hold reference cycles
        # an fp32 artifact (no passes) keeps one weight per module: it is also an input (an ONNX one) for later runs
        proto, lowered = lower_artifact(proto, quantized if recipe.passes else None, recipe.export.dtype,
                                        graph_passes)
    except (ExportError, LoweringError) as exc:
        raise UserError(str(exc)) from None
    del quantized
    pass_records += [{**record, **bits} for record in graph_records]
    # a decoder's tokenizer files go beside the artifact: its folder then runs under ONNX Runtime GenAI
    files = side_files(source.config, proto, ARTIFACT_NAME)
    metadata = artifact_metadata(source.metadata, recipe, options, source.family, source.config, files)
    if task.FITS_REFERENCE:  # what `compress check` needs to score the artifact later (e.g. a probe)
        metadata[metadata_keys.TASK_STATE] = json.dumps(task.task_state(heldout), sort_keys=True)
    graph_facts = {"opset": max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")),
                   "ir_version": proto.ir_version}
    writable = serialized_if_one_file(finalize(proto, metadata))
    del proto
    with staged(out_dir) as stage:
        artifact = stage / ARTIFACT_NAME
        save_onnx(writable, artifact)
        del writable
        for name, content in files.items():
            (stage / name).write_bytes(content)
        seed_line = f"# calibration sampling seed: --seed {options.seed}\n"
        atomic_write_text(stage / "recipe.yaml", recipe.to_yaml() + seed_line)
        log(f"validating on {len(heldout)} held-out examples with ONNX Runtime ({', '.join(options.providers)})")
        results = validate(task, source.config, artifact, heldout, list(options.providers),
                           torch_accuracy=metrics[task.METRIC], reference_logits=reference_logits,
                           tolerances=Tolerances.for_lowered(lowered), bench=options.bench, progress=progress,
                           input_artifact=input_artifact, exact=Tolerances.exact_for_lowered(lowered))
        results["memory"]["compress_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model_record = {**source.record, "params": bits["params"], "input_params": input_bits["params"]}
        report = assemble_report(model_record, recipe, artifact, out_dir / ARTIFACT_NAME, graph_facts, lowered.record,
                                 bits, input_bits, pass_records, reference_metrics, results, baseline_latency)
        report["run"] = {"seed": options.seed, "eval_limit": options.eval_limit, "providers": list(options.providers),
                         "bench_warmup": options.bench.warmup if options.bench else None,
                         "bench_runs": options.bench.runs if options.bench else None}
        write_reports(stage, report, plots=options.plots)
    return report


def _graph_passes(proto: onnx.ModelProto, recipe: Recipe, progress: bool, log) -> tuple[onnx.ModelProto, list]:
    """The recipe's ONNX -> ONNX passes on the lowered graph, each rewriting one onnx_ir model in place."""
    graph_passes = [(name, config) for name, config in recipe.passes if PASSES[name].rewrites == GRAPH]
    if not graph_passes:
        return proto, []
    import onnx_ir as ir

    model, records = ir.serde.deserialize_model(proto), []
    for name, config in graph_passes:
        before = len(model.graph)
        record = PASSES[name].run(model, config, None, progress)
        record["nodes"] = {"before": before, "after": len(model.graph)}
        records.append(record)
        log(f"{name}: {record.get('label', '')}, {before} -> {len(model.graph)} nodes")
    return ir.serde.serialize_model(model), records


def _export_input(source: Source, sample_inputs: dict, path: Path, dtype: str, log) -> Path:
    """The input model exported as the artifact will be (packed, at the artifact's float type), unquantized."""
    log(f"exporting the input model ({dtype}) as the speed baseline")
    try:
        metadata = {metadata_keys.MODEL_CONFIG: json.dumps(source.config, sort_keys=True)}  # its position limit
        proto = baseline_artifact(source.export(source.model, sample_inputs, False), dtype)
        save_onnx(finalize(proto, metadata), path)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    return path

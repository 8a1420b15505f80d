"""`compress run model.onnx`: quantize an existing fp32 ONNX model's MatMul weights, validate, report.

The input must carry the task metadata `compress run` writes (compressor.family, compressor.model_config), so
that its held-out data and metric are known. The input graph run in ONNX Runtime is the reference; the
fake-quantized fp32 graph plays the part the compressed torch model plays for checkpoints (parity reference).
"""
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compressor.checkpoint import sha256_file
from compressor.errors import UserError
from compressor.onnx_input import GRAPH_PASSES, WeightShells, load_onnx_input, matmul_weights, write_back
from compressor.ort_runtime import create_session, logits_fn
from compressor.tasks import TASKS, measure
from compressor.validate import Tolerances, validate
from exporters.onnx_export import finalize, save_onnx
from exporters.qdq import lower_to_qdq
from passes.model_bits import UNQUANTIZED_BITS, total_model_bits
from passes.quantize import quantize_model


def _check_recipe(recipe) -> None:
    for name, config in recipe.passes:
        if name not in GRAPH_PASSES:
            raise UserError(f"{name} needs the torch model: an ONNX input takes only {', '.join(GRAPH_PASSES)} "
                            f"(run it on the checkpoint instead)")
        if getattr(config, "needs_calibration", False):
            raise UserError(f"{name} {config.label()} needs calibration through the torch model: an ONNX input "
                            f"takes round-to-nearest quantization only")


def _graph_bits(proto: onnx.ModelProto, shells: WeightShells) -> dict:
    """Total model bits of the graph: the shells' k-bit weights plus every other float initializer at 32 bits."""
    shell_bits = total_model_bits(shells)
    in_shells = set(shells.onnx_names.values())
    other = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                if t.name not in in_shells and t.data_type == onnx.TensorProto.FLOAT)
    params = shell_bits["params"] + other
    total = shell_bits["total_model_bits"] + other * UNQUANTIZED_BITS
    return {"total_model_bits": total, "bits_per_param": total / params, "params": params,
            "quantized_params": shell_bits["quantized_params"], "unquantized_bits_per_param": UNQUANTIZED_BITS}


def run_onnx(path: Path, out_dir: Path, recipe, options, log) -> dict:
    from compressor.pipeline import ARTIFACT_NAME, apply_graph_passes, assemble_report, prepare_out_dir
    from compressor.report import write_reports
    from compressor.atomic import atomic_write_text, removed_on_failure

    _check_recipe(recipe)
    proto = load_onnx_input(path)
    metadata = {p.key: p.value for p in proto.metadata_props}
    if metadata.get("compressor.family") not in TASKS or "compressor.model_config" not in metadata:
        raise UserError(f"{path} carries no compressor task metadata (compressor.family, compressor.model_config): "
                        f"export the model with `compress run CHECKPOINT` (recipe fp32) to get one")
    family, config = metadata["compressor.family"], json.loads(metadata["compressor.model_config"])
    task = TASKS[family]
    prepare_out_dir(out_dir, options.force)
    shells = WeightShells(matmul_weights(proto))
    input_bits = _graph_bits(proto, shells)
    log(f"loaded {path} ({family}, {input_bits['params']:,} params, {len(shells.layers)} MatMul weights); "
        f"recipe {recipe.name}")

    heldout = task.heldout_data(config, options.eval_limit)
    with tempfile.TemporaryDirectory() as scratch:
        reference_fn = logits_fn(create_session(path))
        if hasattr(task, "fit_reference"):
            task.fit_reference(reference_fn, heldout, options.progress)
        reference_metrics = measure(task, reference_fn, heldout, options.progress)
        pass_records, compressed_fn, fake = [], reference_fn, proto
        for name, pass_config in recipe.passes:  # quantize and fuse (checked above); fuse after lowering
            if name != "quantize":
                continue
            record = quantize_model(shells, pass_config, None, options.progress)
            fake = write_back(proto, shells)
            fake_path = Path(scratch) / "fake_quantized.onnx"
            save_onnx(fake, fake_path)
            compressed_fn = logits_fn(create_session(fake_path))
            record.update(_graph_bits(proto, shells))
            record.update(measure(task, compressed_fn, heldout, options.progress))
            pass_records.append(record)
            log(f"{name}: {record['label']} -> {task.METRIC} {record[task.METRIC]:.4f} (fp32 graph), "
                f"{record['bits_per_param']:.3f} bits/param")
        artifact = out_dir / ARTIFACT_NAME
        lowering = None
        if any(name == "quantize" for name, _ in recipe.passes):
            fake, lowering = lower_to_qdq(fake, shells)
        fake, pass_records = apply_graph_passes(fake, recipe, pass_records, _graph_bits(proto, shells), log)
        metadata.update({"compressor.recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                         "compressor.source": str(path), "compressor.source_sha256": sha256_file(path)})
        if hasattr(task, "task_state"):
            metadata["compressor.task_state"] = json.dumps(task.task_state(heldout), sort_keys=True)
        with removed_on_failure(artifact, out_dir / "recipe.yaml"):
            save_onnx(finalize(fake, metadata), artifact)
            atomic_write_text(out_dir / "recipe.yaml", recipe.to_yaml())
            log(f"validating on {len(heldout)} held-out examples with ONNX Runtime ({', '.join(options.providers)})")
            scored = [r[task.METRIC] for r in pass_records if task.METRIC in r]
            compressed_accuracy = scored[-1] if scored else reference_metrics[task.METRIC]
            results = validate(None, task, config, artifact, heldout, list(options.providers),
                               Tolerances.for_artifact(bool(lowering and lowering["lowered"])), options.bench,
                               torch_accuracy=compressed_accuracy, progress=options.progress,
                               reference_fn=compressed_fn)
            model_record = {"name": Path(path).stem, "family": family, "params": input_bits["params"],
                            "input_params": input_bits["params"], "source": str(path),
                            "source_sha256": sha256_file(path), "config": config, "input_format": "onnx"}
            report = assemble_report(model_record, recipe, artifact, fake, lowering, _graph_bits(proto, shells),
                                     pass_records, reference_metrics, task.METRIC, results, None)
            write_reports(out_dir, report)
    return report

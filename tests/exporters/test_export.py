"""Export parity: torch vs ONNX Runtime on the shipped samples, across dynamic batch and sequence sizes.

Tolerance 1e-4 normwise relative (max|a-b| / max|a|): fp32 kernels differ only in summation order (measured
~1e-6); a real graph error (mask, bias, layout) shows at 1e-2 or more.
"""
import hashlib

import onnx
import pytest

from compressor.inputs.checkpoint import load_checkpoint
from compressor.ort_runtime import create_session, logits_fn
from compressor.tasks import TASKS
from compressor.torch_logits import torch_logits_fn
from compressor.validate import parity
from exporters.onnx_export import IR_VERSION, OPSET, export_onnx, finalize
from compressor.onnx_file import save_onnx

TOLERANCE = 1e-4


def _export(shipped, name, path):
    checkpoint = load_checkpoint(shipped / name)
    task = TASKS[checkpoint.family]
    data = task.heldout_data(checkpoint.config, 64)
    proto = export_onnx(checkpoint.model, task.parity_inputs(data), task.dynamic_axes(checkpoint.config),
                        task.OUTPUT_NAME)
    save_onnx(finalize(proto, {"compressor.source": name}), path)
    return checkpoint, task, proto


@pytest.fixture(scope="module")
def exported(shipped, tmp_path_factory):
    """exported(NAME): the shipped sample's artifact, exported once for this file's tests (each loads its own
    checkpoint: one test changes its model)."""
    paths = {}

    def get(name: str):
        if name not in paths:
            paths[name] = tmp_path_factory.mktemp(name) / "model.onnx"
            _export(shipped, name, paths[name])
        return paths[name]

    return get


@pytest.mark.parametrize("name", ["gpt-xs", "seq2seq-reverse"])
def test_export_parity_over_dynamic_shapes(shipped, exported, name):
    path = exported(name)
    checkpoint = load_checkpoint(shipped / name)
    task = TASKS[checkpoint.family]
    proto = onnx.load(path)
    assert proto.ir_version == IR_VERSION
    assert {op.version for op in proto.opset_import if op.domain == ""} == {OPSET}
    assert {p.key: p.value for p in proto.metadata_props}["compressor.source"] == name
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    ort_fn = logits_fn(create_session(path))
    torch_fn = torch_logits_fn(checkpoint.model, task.INPUT_NAMES)
    for batch in (1, 3, 16):
        inputs = task.benchmark_inputs(checkpoint.config, batch)
        # shorten the sequences too, to exercise the dynamic sequence axes
        inputs = {k: v[:, : max(2, v.shape[1] // (batch % 3 + 1))] for k, v in inputs.items()}
        result = parity(torch_fn(inputs), ort_fn(inputs), TOLERANCE)
        assert result["passed"], (batch, result)


def test_export_is_byte_identical(shipped, exported, tmp_path):
    _export(shipped, "gpt-xs", tmp_path / "again.onnx")  # a second export of the same checkpoint
    digest = [hashlib.sha256(path.read_bytes()).hexdigest() for path in (exported("gpt-xs"), tmp_path / "again.onnx")]
    assert digest[0] == digest[1]


def test_parity_detects_a_wrong_model(shipped, exported):
    """The same check must fail when the artifact is not the model: a perturbed torch reference."""
    checkpoint = load_checkpoint(shipped / "gpt-xs")
    task = TASKS[checkpoint.family]
    inputs = task.benchmark_inputs(checkpoint.config, 2)
    ort_logits = logits_fn(create_session(exported("gpt-xs")))(inputs)
    assert parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), ort_logits, TOLERANCE)["passed"]
    checkpoint.model.blocks[0].mlp.fc_out.bias.data[0] += 0.1  # one channel: a uniform shift would vanish in LayerNorm
    assert not parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), ort_logits, TOLERANCE)["passed"]

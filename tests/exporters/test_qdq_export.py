"""Quantized artifacts: ONNX Runtime fuses the int weights into MatMulNBits (proved on its optimized model),
and every data type's artifact computes exactly what the fake-quantized torch model computes.

Exact comparisons use session.qdq_matmulnbits_accuracy_level=0 (levels <= 3 are exact; the default 4 quantizes
activations to int8), so the fp32 tolerance of 1e-4 normwise relative applies."""
import dataclasses

import onnx
import pytest

from compressor.ort_runtime import create_session, logits_fn
from compressor.torch_logits import torch_logits_fn
from compressor.validate import EXACT_MATMULNBITS, parity
from compressor.inputs.checkpoint import load_checkpoint
from compressor.tasks import TASKS
from exporters.onnx_export import export_onnx
from exporters.pack import pack_parallel_matmuls
from exporters.qdq import LoweringError, lower_to_qdq
from passes.quantize import QuantizeConfig, quantize_model

EXACT_TOLERANCE = 1e-4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_weights_fuse_into_matmulnbits(quantized_artifact, optimized_ops, shipped, tmp_path, bits):
    checkpoint, task, data, record, lowering, path = quantized_artifact(
        shipped, tmp_path, QuantizeConfig(bits=bits, block_size=32, full_range=bits == 4))
    linears = len(record["layers"])
    assert len(lowering["lowered"]) == linears and not lowering["left_fp32"]
    ops, fused_bits = optimized_ops(path, tmp_path)
    assert ops["MatMulNBits"] == linears, ops  # every quantized Linear runs in the k-bit kernel
    assert set(fused_bits) == {bits}
    assert ops["DequantizeLinear"] == 0
    inputs = task.parity_inputs(data)
    exact = logits_fn(create_session(path, options=EXACT_MATMULNBITS))(inputs)
    result = parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), exact, EXACT_TOLERANCE)
    assert result["passed"], result


@pytest.mark.parametrize("config", [
    QuantizeConfig(dtype="nf", bits=4, block_size=32),
    QuantizeConfig(dtype="log2", bits=3, block_size=0),
    QuantizeConfig(dtype="float", bits=5, block_size=64, scale_dtype="float16"),
    QuantizeConfig(dtype="quantile", bits=4, block_size=-1),
    QuantizeConfig(dtype="kmeans", bits=3, block_size=32, codebook_scope="row"),
    QuantizeConfig(dtype="kmeans", bits=4, block_size=32, activation_weighted=True),
    QuantizeConfig(dtype="int", bits=3, block_size=0, symmetric=False),
    QuantizeConfig(dtype="int", bits=6, block_size=-1),
    QuantizeConfig(dtype="int", bits=4, block_size=16, scale_dtype="float16"),
    QuantizeConfig(dtype="int", bits=3, block_size=32, method="gptq"),
    QuantizeConfig(dtype="int", bits=3, block_size=64, method="gptq", full_range=True),
    QuantizeConfig(dtype="int", bits=2, block_size=0, full_range=True),
], ids=lambda c: f"{c.label()}-{c.scale_dtype}-{c.codebook_scope}")
def test_every_data_type_exports_exactly(quantized_artifact, shipped, tmp_path, config):
    checkpoint, task, data, record, lowering, path = quantized_artifact(shipped, tmp_path, config)
    assert len(lowering["lowered"]) == len(record["layers"]) > 0 and not lowering["left_fp32"]
    inputs = task.parity_inputs(data)
    ort_logits = logits_fn(create_session(path, options=EXACT_MATMULNBITS))(inputs)
    result = parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), ort_logits, EXACT_TOLERANCE)
    assert result["passed"], result


@pytest.mark.parametrize("config", [
    QuantizeConfig(bits=4, block_size=32, symmetric=False, zero_point="float"),
    QuantizeConfig(bits=4, block_size=32, symmetric=False, zero_point="float",
                   overrides={"lm_head": {"bits": 8, "symmetric": True, "zero_point": "int"}}),
    QuantizeConfig(bits=3, block_size=64, symmetric=False, zero_point="float", scale_dtype="float16"),
], ids=lambda c: f"{c.label()}-{c.scale_dtype}")
def test_float_zero_points_export_exactly_and_keep_the_kbit_kernel(quantized_artifact, optimized_ops, shipped,
                                                                   tmp_path, config):
    """w = S * (q - z) + c: DequantizeLinear for S * (q - z) plus the block-sum MatMuls for the rests c, packed
    as the pipeline packs them (each block-sum weight joins its main weight). With fp32 scales ORT fuses every
    weight into MatMulNBits (fp16 scales: DequantizeLinear + Cast, exact, unfused)."""
    checkpoint, task, data, record, lowering, path = quantized_artifact(shipped, tmp_path, config)
    proto = onnx.load(path)
    inputs_read = sum(node.name.endswith(".BlockSum") for node in proto.graph.node)  # one x @ E per input
    pack_parallel_matmuls(proto)
    onnx.save(proto, path)
    linears = len(record["layers"])
    assert len(lowering["lowered"]) == linears and not lowering["left_fp32"]
    bits = {layer["module"]: layer["bits"] for layer in record["layers"]}
    assert bits["lm_head"] == (8 if config.overrides else config.bits)
    ops, _ = optimized_ops(path, tmp_path)
    if config.scale_dtype == "float32":
        plain = sum(not entry.get("float_zero_points") for entry in lowering["lowered"])  # lm_head at 8 bits
        assert ops["MatMulNBits"] == inputs_read + plain and ops["DequantizeLinear"] == 0, ops
    inputs = task.parity_inputs(data)
    exact = logits_fn(create_session(path, options=EXACT_MATMULNBITS))(inputs)
    result = parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), exact, EXACT_TOLERANCE)
    assert result["passed"], result


def test_seq2seq_quantizes_and_exports(quantized_artifact, optimized_ops, shipped, tmp_path):
    checkpoint, task, data, record, lowering, path = quantized_artifact(
        shipped, tmp_path, QuantizeConfig(bits=4, block_size=32), name="seq2seq-reverse")
    assert len(lowering["lowered"]) == len(record["layers"])
    ops, _ = optimized_ops(path, tmp_path)
    assert ops["MatMulNBits"] == len(record["layers"])
    inputs = task.parity_inputs(data)
    exact = logits_fn(create_session(path, options=EXACT_MATMULNBITS))(inputs)
    assert parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), exact, EXACT_TOLERANCE)["passed"]


def test_ignored_layers_stay_fp32(quantized_artifact, optimized_ops, shipped, tmp_path):
    config = QuantizeConfig(bits=4, block_size=32, ignore=("lm_head", "re:mlp"))
    checkpoint, task, data, record, lowering, path = quantized_artifact(shipped, tmp_path, config)
    names = {layer["module"] for layer in record["layers"]}
    assert "lm_head" not in names and not any("mlp" in n for n in names)
    assert {s["module"] for s in record["skipped"]} >= {"lm_head", "blocks.0.mlp.fc_in"}
    ops, _ = optimized_ops(path, tmp_path)
    assert ops["MatMulNBits"] == len(names) == 8  # q, k, v, out in each of 2 blocks


def _exported_int4(shipped):
    checkpoint = load_checkpoint(shipped / "gpt-xs")
    task = TASKS[checkpoint.family]
    record = quantize_model(checkpoint.model, QuantizeConfig(bits=4, block_size=32))
    data = task.heldout_data(checkpoint.config, 4)
    proto = export_onnx(checkpoint.model, task.parity_inputs(data), task.dynamic_axes(checkpoint.config),
                        task.OUTPUT_NAME)
    return proto, record["quantized"]


def test_records_are_placed_by_module_name(shipped):
    proto, quantized = _exported_int4(shipped)
    _, lowering = lower_to_qdq(proto, quantized)
    placed = {entry["module"]: entry for entry in lowering["lowered"]}
    assert set(placed) == set(quantized)  # every record lowered, each once
    assert all(e["found_by"] == "name" and e["initializer"] == f"{e['module']}.weight" for e in placed.values())


def test_an_unnamed_weight_is_found_by_its_values(shipped):
    proto, quantized = _exported_int4(shipped)
    target = next(init for init in proto.graph.initializer if init.name == "blocks.0.mlp.fc_in.weight")
    for node in proto.graph.node:
        node.input[:] = ["anonymous" if name == target.name else name for name in node.input]
    target.name = "anonymous"
    _, lowering = lower_to_qdq(proto, quantized)
    entry = next(e for e in lowering["lowered"] if e["module"] == "blocks.0.mlp.fc_in")
    assert entry["initializer"] == "anonymous" and entry["found_by"] == "value"


def test_a_record_with_no_initializer_is_an_error_naming_the_layer(shipped):
    proto, quantized = _exported_int4(shipped)
    layer = quantized["blocks.1.attn.q_proj"]
    codes = layer.quantized.codes.clone()
    codes[0, 0] = (codes[0, 0] + 1) % 8  # values no initializer holds, under a name no initializer has
    stray = dataclasses.replace(layer, module="blocks.9.attn.q_proj", weight_names=("blocks.9.attn.q_proj.weight",),
                                quantized=dataclasses.replace(layer.quantized, codes=codes))
    with pytest.raises(LoweringError, match="'blocks.9.attn.q_proj'.*matches no MatMul weight"):
        lower_to_qdq(proto, {**quantized, stray.module: stray})


def test_a_name_that_holds_other_values_is_an_error(shipped):
    proto, quantized = _exported_int4(shipped)
    wrong = dataclasses.replace(quantized["blocks.0.attn.k_proj"], module="blocks.0.attn.q_proj",
                                weight_names=("blocks.0.attn.q_proj.weight",))
    with pytest.raises(LoweringError, match="'blocks.0.attn.q_proj'.*not its dequantized values"):
        lower_to_qdq(proto, {"blocks.0.attn.q_proj": wrong})

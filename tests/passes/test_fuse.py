"""The fuse pass (ONNX -> ONNX): which fusions fire on a real exported graph, that the fused graph computes the
same logits under ONNX Runtime (fp32 tolerance 1e-4 normwise: fusion only reorders float sums), that k-bit
weights still become MatMulNBits, and a graph where the rule must not fire."""
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from compressor.ort_runtime import create_session, logits_fn
from compressor.validate import EXACT_MATMULNBITS, parity
from exporters.onnx_export import finalize
from compressor.onnx_file import save_onnx
from passes.fuse import FuseConfig, fuse_onnx
from passes.quantize import QuantizeConfig


def test_layer_fusions_on_a_quantized_gpt(quantized_artifact, optimized_ops, shipped, tmp_path):
    checkpoint, task, data, record, _, path = quantized_artifact(shipped, tmp_path, QuantizeConfig(bits=4))
    model = ir.serde.deserialize_model(onnx.load(str(path)))
    nodes_before = len(model.graph)
    fuse_record = fuse_onnx(model, FuseConfig())
    fused = ir.serde.serialize_model(model)
    layers = checkpoint.config["layers"]
    # per block: two residual LayerNorms -> SkipLayerNormalization; the FFN's bias + GELU -> BiasGelu
    assert fuse_record["fusions"] == {"skip_layer_normalization": 2 * layers, "bias_gelu": layers}
    assert len(fused.graph.node) < nodes_before
    before = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    after = Counter(n.op_type for n in fused.graph.node)
    assert after["MatMul"] == before["MatMul"] and after["DequantizeLinear"] == before["DequantizeLinear"]
    fused_path = tmp_path / "fused.onnx"
    save_onnx(finalize(fused, {}), fused_path)
    ops, _ = optimized_ops(fused_path, tmp_path)
    assert ops["MatMulNBits"] == len(record["layers"])  # k-bit weights still reach the k-bit kernel
    inputs = task.parity_inputs(data)
    unfused = logits_fn(create_session(path, options=EXACT_MATMULNBITS))(inputs)
    result = parity(unfused, logits_fn(create_session(fused_path, options=EXACT_MATMULNBITS))(inputs), 1e-4)
    assert result["passed"], result  # measured 3.7e-7


def test_layernorm_without_residual_is_not_fused(tmp_path):
    """A LayerNormalization that no Add feeds is left as it is: nothing to fuse."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1)],
                              "g", [x], [y], [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    graph = ir.serde.deserialize_model(model)
    record = fuse_onnx(graph, FuseConfig())
    assert record["fusions"] == {}
    assert [n.op_type for n in graph.graph] == ["LayerNormalization"]

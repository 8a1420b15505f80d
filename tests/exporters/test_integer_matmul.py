"""exporters.integer_matmul: W8A8 Linears become ONNX Runtime's integer kernels with the bias inside, values
unchanged; q/k/v sharing one dynamic quantization keep sharing it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.validate import parity
from exporters.integer_matmul import fuse_integer_matmuls
from exporters.qdq import lower_to_qdq
from passes import activation_primitives as ap
from passes import quant_primitives as qp
from passes.quantize.activations import ActivationQuant
from passes.quant_primitives import dequantize
from passes.quantize import QuantizedLayer
from passes.quantize.int_weights import IntWeights

K, N = 96, 160
TOLERANCE = 1e-5  # integer GEMMs are exact; the float scaling of the int32 result and the bias Add round


def _linears(weights: dict[str, np.ndarray], biases: dict[str, np.ndarray]) -> onnx.ModelProto:
    """y_name = x @ W_name (+ b_name) for each weight, all reading x (the exported form of sibling nn.Linears)."""
    nodes, inits, outputs = [], [], []
    for name, weight in weights.items():
        inits.append(numpy_helper.from_array(weight, f"{name}.weight"))
        product = name if name not in biases else f"{name}.product"
        nodes.append(helper.make_node("MatMul", ["x", f"{name}.weight"], [product], name=f"{name}.MatMul"))
        if name in biases:
            inits.append(numpy_helper.from_array(biases[name], f"{name}.bias"))
            nodes.append(helper.make_node("Add", [product, f"{name}.bias"], [name], name=f"{name}.Add"))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "S", weight.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> tuple[list[str], ort.InferenceSession]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node], session


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("siblings", [1, 3], ids=["one linear", "q/k/v"])
def test_integer_kernels_take_the_bias_and_compute_the_same(tmp_path, mode, siblings):
    torch.manual_seed(0)
    x = torch.randn(2, 8, K) * 2
    names = ["q", "k", "v"][:siblings]
    quantized = {n: qp.quantize_int_symmetric(torch.randn(N, K) * 0.05, 7, qp.PER_CHANNEL) for n in names}
    biases = {n: np.random.default_rng(i).standard_normal(N).astype(np.float32) for i, n in enumerate(names)}
    if mode == "static":
        scale, zero = ap.static_qparams(float(x.min()), float(x.max()), "uint8")
        quant, x_q = ActivationQuant("static", "uint8", scale, zero), ap.fake_quantize(x, scale, zero, "uint8")
    else:
        quant, x_q = ActivationQuant("dynamic"), ap.fake_quantize_dynamic(x)
    weights = {n: np.ascontiguousarray(dequantize(q).numpy().T) for n, q in quantized.items()}
    layers = {n: QuantizedLayer(n, (f"{n}.weight",), q, IntWeights(bits=7, block_size=0), quant) for n, q in quantized.items()}
    proto, _ = lower_to_qdq(_linears(weights, biases), layers)
    counts = fuse_integer_matmuls(proto)
    assert counts == {"integer_matmuls": siblings, "biases_fused": siblings}
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMul" not in ops and "Add" not in ops and ops.count("DequantizeLinear") == 0, ops
    # one quantization of x for all siblings; a lone dynamic Linear quantizes inside its own kernel
    kernel = "DynamicQuantizeMatMul" if mode == "dynamic" and siblings == 1 else "MatMulIntegerToFloat"
    assert ops.count(kernel) == siblings
    quantizers = ops.count("QuantizeLinear") + ops.count("DynamicQuantizeLinear")
    assert quantizers == (1 if kernel == "MatMulIntegerToFloat" else 0)
    optimized, session = _optimized_ops(proto, tmp_path)
    assert "Add" not in optimized and "MatMul" not in optimized, optimized
    got = session.run(None, {"x": x.numpy()})
    for name, value in zip(names, got):
        expected = (x_q @ dequantize(quantized[name]).T).numpy() + biases[name]
        assert parity(expected, value, TOLERANCE)["passed"], name


def test_weight_only_linears_are_left_alone():
    """Without an activation quantization in front, a MatMul stays a MatMul (ONNX Runtime's MatMulNBits)."""
    torch.manual_seed(0)
    q = qp.quantize_int_symmetric(torch.randn(N, K) * 0.05, 7, qp.PER_CHANNEL)
    proto, _ = lower_to_qdq(_linears({"y": np.ascontiguousarray(dequantize(q).numpy().T)}, {}),
                            {"y": QuantizedLayer("y", ("y.weight",), q, IntWeights(bits=7, block_size=0), None)})  # weight-only: no activation Q
    assert fuse_integer_matmuls(proto) == {"integer_matmuls": 0, "biases_fused": 0}
    assert "MatMul" in [n.op_type for n in proto.graph.node]

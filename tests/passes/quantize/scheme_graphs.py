"""Helpers of the scheme tests (a module of its own: test files import it by name, never `conftest`). One weight
scheme's lowering in a graph of its own: x [rows, K] -> the scheme's nodes -> MatMul -> y, run by
ONNX Runtime at MatMulNBits accuracy level 0 (exact: fp32 arithmetic, only the summation order differs)."""
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from compressor.validate import EXACT_MATMULNBITS
from passes import quant_primitives as qp

# fp32 x @ W with K <= 256: the reference and ONNX Runtime differ by summation order only (measured <= 3e-7)
EXACT = 1e-5


def run_graph(nodes: list, initializers: list, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    declared = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
                for name, value in inputs.items()]
    graph = helper.make_graph(nodes, "scheme", declared,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, None])], initializers)
    opsets = [helper.make_opsetid("", 21)]
    if any(node.domain == "com.microsoft" for node in nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    for key, value in EXACT_MATMULNBITS.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([output], inputs)[0]


def lowered_matmul(scheme, q, x: np.ndarray) -> np.ndarray:
    """y = x @ Wᵀ with W as `scheme` lowers q, around the MatMul too (e.g. float zero points' offset terms)."""
    nodes, inits = scheme.lower("w", q, "w.dequantized")
    ahead, after, extra_inits, _ = scheme.lower_around_matmul("w.0", q, "x", "y.main", "y", None)
    matmul = helper.make_node("MatMul", ["x", "w.dequantized"], ["y.main" if after else "y"], name="MatMul")
    return run_graph(nodes + ahead + [matmul] + after, inits + extra_inits, {"x": x}, "y")


def expanded_scales(q, shape) -> torch.Tensor:
    """Each weight's group scale, [N, K]."""
    scales = q.scales.float()
    if q.block_size > 0:
        return torch.repeat_interleave(scales, qp.group_size(tuple(shape), q.block_size), dim=1)
    return scales.expand(*shape)


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    return float(np.abs(reference - value).max() / np.abs(reference).max())

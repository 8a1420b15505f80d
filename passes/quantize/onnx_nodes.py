"""ONNX building blocks the schemes' lowerings share: the integer types that carry k-bit codes, a per-row field
laid out for the ONNX weight [K, N], and a DequantizeLinear that yields float32 whatever its scale type."""
import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto, helper

from passes.model_bits import container_bits
from passes.quant_primitives import PER_CHANNEL, PER_TENSOR, Quantized

SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}


def code_type(q: Quantized) -> type:
    """The numpy type of q's codes in ONNX: unsigned where a zero point goes with them."""
    return (UNSIGNED if q.zero_points is not None else SIGNED)[container_bits(q.bits)]


def by_column(field: torch.Tensor, block_size: int) -> np.ndarray:
    """A per-row field of the torch weight ([N, groups]) laid out for the ONNX weight [K, N]: [K/B, N] for blocks,
    [N] per-channel, a scalar per-tensor."""
    values = field.numpy()
    if block_size == PER_TENSOR:
        return values.reshape(-1)[0].reshape(())
    return values[:, 0] if block_size == PER_CHANNEL else np.ascontiguousarray(values.T)


def dequantize_node(name: str, inputs: list[str], out: str, scale_dtype: np.dtype, attrs: dict) -> list:
    """DequantizeLinear into `out` (float32; a float16 scale dequantizes to float16, then a Cast)."""
    dequant_out = out if scale_dtype == np.float32 else f"{name}.dequant_fp16"
    nodes = [helper.make_node("DequantizeLinear", inputs, [dequant_out], name=f"{name}.DequantizeLinear", **attrs)]
    if dequant_out != out:
        nodes.append(helper.make_node("Cast", [dequant_out], [out], name=f"{name}.Cast", to=TensorProto.FLOAT))
    return nodes

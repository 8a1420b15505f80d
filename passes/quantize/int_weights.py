"""Integer weights: uniform levels per block, row or tensor. Symmetric (absmax, optionally with level -2^(k-1):
Q4_0 / ONNX Runtime style), asymmetric with an integer zero point, or with a float zero point (Q4_1 style: the
block minimum). Round to nearest, with each group's scale covering the group or searched for the least
(activation-weighted) squared error (`scale_search`, passes.quant_primitives.quantize_int_searched), or GPTQ
(passes.gptq, the solver). One home: the config, the per-layer quantizer and the ONNX lowering.

Lowering: codes [K, N] (int2/int4/int8, or uint with a zero point) -> DequantizeLinear(axis 0, block_size B) ->
MatMul, the pattern ONNX Runtime fuses into MatMulNBits (per-channel: axis 1 scales). Float zero points
(w = S * (q - z) + c per block, z the nearest integer zero point and c the fractional rest; DequantizeLinear's zero
point is an integer): DequantizeLinear as above for S * (q - z), plus the rests' share x @ C = (x @ E) @ C_blocks,
where E [K, K/B] sums x over each block and C_blocks [K/B, N] holds the rests: two small MatMuls (1/B of the main
one's work) and an Add after the main MatMul. E is stored as k-bit codes of the main weight's kind (0/1 levels,
scale 1: exact), so ONNX Runtime runs it as a MatMulNBits too and exporters.pack folds it into the main weight's
kernel (one call computes x @ W and the block sums).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from passes import quant_primitives as qp
from passes.calibration import excerpt
from passes.gptq import gptq_quantize
from passes.model_bits import container_bits
from passes.quantize.labels import weight_label
from passes.quantize.onnx_nodes import UNSIGNED, by_column, code_type, dequantize_node

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
ZERO_POINTS = ("int", "float")
METHODS = ("rtn", "gptq")
# how group scales are chosen: "none" covers the group (absmax / min-max); "mse" searches the scale (and zero
# point) with the least squared reconstruction error per group (passes.quant_primitives.quantize_int_searched);
# "activation" weights that error by each input channel's mean x^2 on calibration data
SCALE_SEARCHES = ("none", "mse", "activation")


def check_bits_and_groups(fields) -> None:
    """bits, block_size and scale_dtype, which every weight scheme has (ValueError, one line)."""
    if isinstance(fields.bits, bool) or not isinstance(fields.bits, int) or not 2 <= fields.bits <= 8:
        raise ValueError(f"quantize.bits must be an integer in 2..8, not {excerpt(fields.bits)}")
    block = fields.block_size
    if isinstance(block, bool) or not isinstance(block, int) or (
            block not in (qp.PER_CHANNEL, qp.PER_TENSOR) and (block < 16 or block > 1024 or block & (block - 1))):
        raise ValueError(f"quantize.block_size must be a power of two in 16..1024, 0 (per-channel) or -1 "
                         f"(per-tensor), not {excerpt(block)}")
    if fields.scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"quantize.scale_dtype must be float32 or float16, not {excerpt(fields.scale_dtype)}")


def check(fields) -> None:
    """This scheme's fields on any object holding them (IntWeights, or the recipe's QuantizeConfig)."""
    check_bits_and_groups(fields)
    if fields.method not in METHODS:
        raise ValueError(f"quantize.method must be rtn or gptq, not {excerpt(fields.method)}")
    if fields.zero_point not in ZERO_POINTS:
        raise ValueError(f"quantize.zero_point must be int or float, not {excerpt(fields.zero_point)}")
    for name in ("symmetric", "full_range"):
        if not isinstance(getattr(fields, name), bool):
            raise ValueError(f"quantize.{name} must be true or false, not {excerpt(getattr(fields, name))}")
    if isinstance(fields.gptq_damp, bool) or not 0 < fields.gptq_damp < math.inf:  # also refuses NaN
        raise ValueError(f"quantize.gptq_damp must be a positive number, not {excerpt(fields.gptq_damp)}")
    if fields.scale_search not in SCALE_SEARCHES:
        raise ValueError(f"quantize.scale_search must be one of {', '.join(SCALE_SEARCHES)}, not "
                         f"{excerpt(fields.scale_search)}")


@dataclass(frozen=True)
class IntWeights:
    bits: int = 4
    block_size: int = 64  # B along the input dim; 0 = per-channel, -1 = per-tensor
    symmetric: bool = True  # absmax (True) or min-max with zero point (False)
    zero_point: str = "int"  # asymmetric: "int" (ONNX's, 0 on a level) or "float" (block minimum, Q4_1 style)
    full_range: bool = False  # symmetric only: also use level -2^(k-1) (Q4_0 / ORT style)
    scale_dtype: str = "float32"
    method: str = "rtn"  # or "gptq"
    gptq_damp: float = 0.01
    scale_search: str = "none"  # or "mse" / "activation" (SCALE_SEARCHES)

    def __post_init__(self):
        check(self)
        if self.zero_point == "float" and (self.symmetric or self.block_size <= 0):
            raise ValueError("quantize.zero_point=float needs dtype=int, symmetric=false and a block size")
        if self.zero_point == "float" and self.method != "rtn":
            raise ValueError("quantize.zero_point=float works with method=rtn only")
        if self.method == "gptq" and self.block_size == qp.PER_TENSOR:
            raise ValueError("quantize.method=gptq needs per-channel (0) or block-wise scales")
        if self.scale_search != "none" and (self.zero_point == "float" or self.method != "rtn"):
            raise ValueError("quantize.scale_search works with method=rtn and symmetric codes or an int zero point, "
                             "not zero_point=float or GPTQ")

    @property
    def rows_independent(self) -> bool:
        """Whether each output row is quantized on its own, elementwise within its groups, so that quantizing a
        weight a few rows at a time gives the same bits (GPTQ's blocked updates are GEMMs whose sums may round
        differently with the row count: not claimed)."""
        return self.method == "rtn" and self.block_size != qp.PER_TENSOR

    @property
    def needs_statistics(self) -> bool:
        """Whether quantize() needs the layer's input second moments (the Hessian)."""
        return self.method == "gptq" or self.scale_search == "activation"

    @property
    def diagonal_statistics(self) -> bool:
        """Whether quantize() reads only the Hessian's diagonal (the activation-weighted scale search; GPTQ reads
        the whole matrix)."""
        return self.method != "gptq"

    @property
    def input_multiple(self) -> int | None:
        """Plain rounding takes a shorter last block (ONNX's ceil(K / B) blocks); GPTQ needs whole ones."""
        return self.block_size if self.block_size > 0 and self.method == "gptq" else None

    def label_parts(self) -> list[str]:
        parts = [weight_label("int", self.bits, self.block_size)]
        if not self.symmetric:
            parts.append("asym" if self.zero_point == "int" else "asym-fzp")
        if self.symmetric and self.full_range:
            parts.append("full")
        if self.method == "gptq":
            parts.append("gptq")
        if self.scale_search != "none":
            parts.append({"mse": "mse", "activation": "amse"}[self.scale_search])
        return parts

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> qp.Quantized:
        scale_dtype = SCALE_DTYPES[self.scale_dtype]
        if self.method == "gptq":
            return gptq_quantize(weight, hessian, self.bits, self.block_size, self.symmetric, scale_dtype,
                                 self.gptq_damp, self.full_range)
        if self.scale_search != "none":
            importance = None
            if self.scale_search == "activation":  # H [K, K] or its diagonal [K]: each input channel's sum of x²
                importance = hessian if hessian.dim() == 1 else torch.diagonal(hessian)
            return qp.quantize_int_searched(weight, self.bits, self.block_size, scale_dtype, self.symmetric,
                                            self.full_range, importance)
        if self.symmetric:
            return qp.quantize_int_symmetric(weight, self.bits, self.block_size, scale_dtype, self.full_range)
        if self.zero_point == "float":
            return qp.quantize_int_float_zero(weight, self.bits, self.block_size, scale_dtype)
        return qp.quantize_int_asymmetric(weight, self.bits, self.block_size, scale_dtype)

    def lower(self, name: str, q: qp.Quantized, out: str) -> tuple[list, list]:
        return weight_nodes(name, q, out)

    def lower_around_matmul(self, name: str, q: qp.Quantized, x: str, main_out: str, out: str,
                            block_sums: str | None) -> tuple[list, list, list, str | None]:
        return offset_nodes(name, q, x, block_sums, main_out, out)


def weight_nodes(name: str, q: qp.Quantized, out: str) -> tuple[list, list]:
    """Codes [K, N] -> DequantizeLinear (axis 0 blocks / axis 1 per-channel / per-tensor) -> out."""
    dtype = code_type(q)
    scale = by_column(q.scales, q.block_size)
    initializers = [numpy_helper.from_array(np.ascontiguousarray(q.codes.numpy().T).astype(dtype), f"{name}.codes"),
                    numpy_helper.from_array(scale, f"{name}.scale")]
    inputs = [f"{name}.codes", f"{name}.scale"]
    if q.zero_points is not None:
        initializers.append(numpy_helper.from_array(by_column(q.zero_points, q.block_size).astype(dtype),
                                                    f"{name}.zero_point"))
        inputs.append(f"{name}.zero_point")
    attrs = {"axis": 0, "block_size": q.block_size} if q.block_size > 0 else \
        {"axis": 1} if q.block_size == qp.PER_CHANNEL else {}
    return dequantize_node(name, inputs, out, scale.dtype, attrs), initializers


def _block_sum_nodes(name: str, q: qp.Quantized, x: str, out: str) -> tuple[list, list]:
    """out = x @ E, E [K, K/B] with E[k, j] = 1 where k is in block j: DequantizeLinear of 0/1 codes of the main
    weight's code type, zero point 0 and scale 1 (exact in any scale dtype), blocked as the main weight is."""
    rows, blocks = q.codes.shape[1], q.offsets.shape[1]
    dtype = UNSIGNED[container_bits(q.bits)]
    codes = np.zeros((rows, blocks), dtype)
    codes[np.arange(rows), np.arange(rows) // q.block_size] = 1
    scale_dtype = q.scales.numpy().dtype
    initializers = [numpy_helper.from_array(codes, f"{name}.block_sum_codes"),
                    numpy_helper.from_array(np.ones((blocks, blocks), scale_dtype), f"{name}.block_sum_scale"),
                    numpy_helper.from_array(np.zeros((blocks, blocks), dtype), f"{name}.block_sum_zero_point")]
    weight = f"{name}.block_sum_matrix"
    nodes = dequantize_node(f"{name}.block_sum", [t.name for t in initializers], weight, scale_dtype,
                            {"axis": 0, "block_size": q.block_size})
    nodes.append(helper.make_node("MatMul", [x, weight], [out], name=f"{name}.BlockSum"))
    return nodes, initializers


def offset_nodes(name: str, q: qp.Quantized, x: str, block_sums: str | None, main_out: str,
                 out: str) -> tuple[list, list, list, str | None]:
    """For float zero points: out = main_out + (x @ E) @ C_blocks (see the module doc); nothing otherwise.
    `block_sums` names an x @ E already computed for the same input and block size (Q, K and V share one).
    Returns the nodes that go before the main MatMul (x @ E: packed, it then leads the weights, so that the main
    outputs stay side by side for merge_adds_over_splits), the nodes after it, the initializers and the name of
    x @ E for the next MatMul of that input."""
    if q.offsets is None:
        return [], [], [], None
    offsets = np.ascontiguousarray(q.offsets.numpy().T)  # [K/B, N]
    ahead, nodes, initializers = [], [], [numpy_helper.from_array(offsets, f"{name}.offsets")]
    offsets_name = f"{name}.offsets"
    if offsets.dtype != np.float32:
        nodes.append(helper.make_node("Cast", [offsets_name], [f"{name}.offsets32"], name=f"{name}.OffsetCast",
                                      to=TensorProto.FLOAT))
        offsets_name = f"{name}.offsets32"
    if block_sums is None:
        block_sums = f"{name}.block_sums"
        ahead, sum_inits = _block_sum_nodes(name, q, x, block_sums)
        initializers += sum_inits
    nodes += [helper.make_node("MatMul", [block_sums, offsets_name], [f"{name}.offset_term"], name=f"{name}.Offsets"),
              helper.make_node("Add", [main_out, f"{name}.offset_term"], [out], name=f"{name}.AddOffsets")]
    return ahead, nodes, initializers, block_sums


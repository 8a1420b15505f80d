"""Codebook weights: each block's values normalized by its absmax and rounded to the nearest entry of a codebook
of 2^k values. Fixed codebooks (log2, float ExMy, NormalFloat) or fitted ones (quantile, k-means, optionally
activation-weighted), per tensor or per output row. One home: the config, the per-layer quantizer and the ONNX
lowering.

Lowering: uint indices [K, N] -> Cast(int32) -> Gather(codebook) -> Mul(block scales) -> MatMul. ONNX Runtime has
no k-bit kernel for these: it constant-folds them back to fp32 at session start (small file, fp32 speed and
memory).
"""
from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from passes import quant_primitives as qp
from passes.calibration import check_int, excerpt
from passes.model_bits import container_bits
from passes.quantize.int_weights import SCALE_DTYPES, check_bits_and_groups
from passes.quantize.labels import weight_label
from passes.quantize.onnx_nodes import UNSIGNED, by_column

DTYPES = ("log2", "float", "nf", "quantile", "kmeans")
SCOPES = ("tensor", "row")
MAX_KMEANS_ITERATIONS = 10_000  # Lloyd iterations converge in tens; 10k is already minutes per large layer


def check(fields) -> None:
    """This scheme's fields on any object holding them (CodebookWeights, or the recipe's QuantizeConfig)."""
    check_bits_and_groups(fields)
    if fields.exponent_bits is not None:  # a float of 2..8 bits has 1 sign bit and 1..7 exponent bits
        check_int("quantize.exponent_bits", fields.exponent_bits, 1, 7)
    if not isinstance(fields.activation_weighted, bool):
        raise ValueError(f"quantize.activation_weighted must be true or false, not "
                         f"{excerpt(fields.activation_weighted)}")
    if fields.codebook_scope not in SCOPES:
        raise ValueError(f"quantize.codebook_scope must be tensor or row, not {excerpt(fields.codebook_scope)}")
    check_int("quantize.kmeans_iterations", fields.kmeans_iterations, 1, MAX_KMEANS_ITERATIONS)


@dataclass(frozen=True)
class CodebookWeights:
    dtype: str = "nf"
    bits: int = 4
    block_size: int = 64  # B along the input dim; 0 = per-channel, -1 = per-tensor
    scale_dtype: str = "float32"
    exponent_bits: int | None = None  # float only; default ceil(k/2)
    codebook_scope: str = "tensor"  # quantile / kmeans: one codebook per tensor or per output row
    kmeans_iterations: int = 25
    activation_weighted: bool = False  # kmeans: weight each weight by its input channel's mean x²

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"codebook dtype must be one of {', '.join(DTYPES)}, not {excerpt(self.dtype)}")
        check(self)
        if self.dtype == "float":
            qp.float_codebook(self.bits, self.exponent_bits)  # raises on an impossible split

    @property
    def rows_independent(self) -> bool:
        """Whether each output row is quantized on its own (a fixed table or one codebook per row, scales per row
        or block): then a weight quantized a few rows at a time gives the same bits."""
        return self.block_size != qp.PER_TENSOR and (self.dtype not in ("quantile", "kmeans")
                                                     or self.codebook_scope == "row")

    @property
    def needs_statistics(self) -> bool:
        """Whether quantize() needs the layer's input second moments (activation-weighted k-means)."""
        return self.dtype == "kmeans" and self.activation_weighted

    @property
    def diagonal_statistics(self) -> bool:
        """Whether quantize() reads only the Hessian's diagonal. Weighted k-means does, but keeps the full matrix
        it has always been given (its artifacts keep their bytes)."""
        return False

    @property
    def input_multiple(self) -> int | None:
        """Codebooks need whole blocks."""
        return self.block_size if self.block_size > 0 else None

    def label_parts(self) -> list[str]:
        parts = [weight_label(self.dtype, self.bits, self.block_size)]
        if self.dtype == "kmeans" and self.activation_weighted:
            parts.append("aw")
        if self.dtype in ("quantile", "kmeans") and self.codebook_scope == "row":
            parts.append("row")
        return parts

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> qp.Quantized:
        scale_dtype = SCALE_DTYPES[self.scale_dtype]
        bits, block = self.bits, self.block_size
        if self.dtype in ("log2", "float", "nf"):
            codebook = {"log2": lambda: qp.log2_codebook(bits), "nf": lambda: qp.normal_float_codebook(bits),
                        "float": lambda: qp.float_codebook(bits, self.exponent_bits)}[self.dtype]()
            return qp.quantize_codebook(weight, codebook, bits, block, scale_dtype)
        normalized = qp.normalized_groups(weight, block, scale_dtype)
        if self.dtype == "quantile":
            if self.codebook_scope == "row":
                codebook = torch.stack([qp.quantile_codebook(row, bits) for row in normalized])
            else:
                codebook = qp.quantile_codebook(normalized, bits)
            return qp.quantize_codebook(weight, codebook, bits, block, scale_dtype)
        importance = None
        if self.activation_weighted:
            importance = torch.diag(hessian).float()[None, :].expand_as(weight)
        if self.codebook_scope == "row":
            codebook = qp.kmeans_codebook(normalized, bits, importance, self.kmeans_iterations)
        else:
            flat_importance = None if importance is None else importance.reshape(1, -1)
            codebook = qp.kmeans_codebook(normalized.reshape(1, -1), bits, flat_importance,
                                          self.kmeans_iterations)[0]
        return qp.quantize_codebook(weight, codebook, bits, block, scale_dtype)

    def lower(self, name: str, q: qp.Quantized, out: str) -> tuple[list, list]:
        return weight_nodes(name, q, out)

    def lower_around_matmul(self, name: str, q: qp.Quantized, x: str, main_out: str, out: str,
                            block_sums: str | None) -> tuple[list, list, list, str | None]:
        return [], [], [], None  # the weight's own nodes are the whole lowering


def weight_nodes(name: str, q: qp.Quantized, out: str) -> tuple[list, list]:
    indices = np.ascontiguousarray(q.codes.numpy().T)  # [K, N]
    rows, cols = indices.shape
    codebook = q.codebook.numpy()
    shared = codebook.ndim == 1 or all(np.array_equal(row, codebook[0]) for row in codebook)
    if codebook.ndim == 2:  # one codebook per output row (= ONNX column), laid end to end when they differ
        codebook = codebook[0] if shared else codebook.reshape(-1)
    initializers = [numpy_helper.from_array(indices.astype(UNSIGNED[container_bits(q.bits)]), f"{name}.indices"),
                    numpy_helper.from_array(codebook.astype(np.float32), f"{name}.codebook")]
    nodes = [helper.make_node("Cast", [f"{name}.indices"], [f"{name}.index32"], name=f"{name}.Cast",
                              to=TensorProto.INT32)]
    index = f"{name}.index32"
    if not shared:  # column j's entries start at j * C
        offsets = (np.arange(cols, dtype=np.int32) * q.codebook.shape[1])[None, :]
        initializers.append(numpy_helper.from_array(offsets, f"{name}.codebook_offsets"))
        nodes.append(helper.make_node("Add", [index, f"{name}.codebook_offsets"], [f"{name}.flat_index"],
                                      name=f"{name}.Add"))
        index = f"{name}.flat_index"
    nodes.append(helper.make_node("Gather", [f"{name}.codebook", index], [f"{name}.normalized"],
                                  name=f"{name}.Gather"))
    scale = by_column(q.scales, q.block_size)
    scale_name = f"{name}.scale"
    initializers.append(numpy_helper.from_array(
        scale.reshape(rows // q.block_size, 1, cols) if q.block_size > 0 else scale, scale_name))
    if scale.dtype != np.float32:
        nodes.append(helper.make_node("Cast", [scale_name], [f"{name}.scale32"], name=f"{name}.ScaleCast",
                                      to=TensorProto.FLOAT))
        scale_name = f"{name}.scale32"
    if q.block_size > 0:
        initializers += [numpy_helper.from_array(np.array([rows // q.block_size, q.block_size, cols], np.int64),
                                                 f"{name}.blocked_shape"),
                         numpy_helper.from_array(np.array([rows, cols], np.int64), f"{name}.shape")]
        nodes += [helper.make_node("Reshape", [f"{name}.normalized", f"{name}.blocked_shape"], [f"{name}.blocked"],
                                   name=f"{name}.Reshape"),
                  helper.make_node("Mul", [f"{name}.blocked", scale_name], [f"{name}.scaled"], name=f"{name}.Mul"),
                  helper.make_node("Reshape", [f"{name}.scaled", f"{name}.shape"], [out], name=f"{name}.Unblock")]
    else:
        nodes.append(helper.make_node("Mul", [f"{name}.normalized", scale_name], [out], name=f"{name}.Mul"))
    return nodes, initializers

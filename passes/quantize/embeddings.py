"""Embedding tables: nn.Embedding rows as symmetric int codes (8 bits, or 4 bits in blocks), and the lookup of
rows from any int-coded table, an embedding of its own or one tied to a quantized Linear (an LM's lm_head). One
home: the config, the quantizer and the ONNX lowering of the lookup.

Lowering: what stands for Gather(table, ids), so that only the looked-up rows are dequantized (a DequantizeLinear
of the whole table would run on every call, the Gather's input being a graph input's function):
- 4-bit codes in power-of-two blocks of >= 16: com.microsoft GatherBlockQuantized (ONNX Gather takes no int4);
- 8-bit codes: Gather(codes), Gather(scales) (, zero points) -> DequantizeLinear over the rows' last axis;
- anything else (int4 per-channel or odd blocks, int2): DequantizeLinear of the table, then the Gather.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from passes import quant_primitives as qp
from passes.calibration import excerpt, matches
from passes.model_bits import container_bits
from passes.quantize.int_weights import SCALE_DTYPES
from passes.quantize.onnx_nodes import code_type, dequantize_node
from passes.quantize.rows import quantize_rows

EMBEDDING_BITS = (4, 8)
# how a table tied to a quantized Linear (an LM's lm_head) is stored: "copy" gives the lookup codes of its own in the
# table's layout [rows, dim] beside the Linear's [dim, rows]; "shared" stores them once, the Linear's, and the
# lookup reads them through a Transpose of those initializers, which ONNX Runtime folds into a constant when the
# session starts (the Linear's DequantizeLinear -> MatMul still becomes MatMulNBits: ORT fuses it only while the
# DequantizeLinear is the sole reader of its initializers, so the lookup cannot read them directly)
TIED_TABLES = ("copy", "shared")


class NotLowered(Exception):
    """A tied table whose codes the lookup cannot read (it stays float; the reason goes in the report)."""


def check(fields) -> None:
    """embedding_bits and embedding_block_size on any object holding them (ValueError, one line)."""
    if fields.embedding_bits is not None and (isinstance(fields.embedding_bits, bool)
                                              or fields.embedding_bits not in EMBEDDING_BITS):
        raise ValueError(f"quantize.embedding_bits must be 8, 4 or null (float tables), not "
                         f"{excerpt(fields.embedding_bits)}")
    block = fields.embedding_block_size
    if isinstance(block, bool) or not isinstance(block, int) or (block != qp.PER_CHANNEL and (
            block < 16 or block > 1024 or block & (block - 1))):
        raise ValueError(f"quantize.embedding_block_size must be 0 (one scale per row) or a power of two in "
                         f"16..1024, not {excerpt(block)}")
    if fields.embedding_bits == 4 and block == qp.PER_CHANNEL:
        raise ValueError("quantize.embedding_bits=4 needs an embedding_block_size (16..1024, e.g. 32): "
                         "4-bit rows are looked up by com.microsoft GatherBlockQuantized, which takes blocks")


def check_tied_table(tied_table) -> None:
    if tied_table not in TIED_TABLES:
        raise ValueError(f"quantize.tied_table must be copy or shared, not {excerpt(tied_table)}")


@dataclass(frozen=True)
class EmbeddingTables:
    embedding_bits: int = 8
    embedding_block_size: int = 0  # along the row; 0: one scale per row
    scale_dtype: str = "float32"

    def __post_init__(self):
        check(self)

    def label_parts(self) -> list[str]:
        return [f"emb{self.embedding_bits}"]

    def quantize(self, table: torch.Tensor) -> qp.Quantized:
        return qp.quantize_int_symmetric(table, self.embedding_bits, self.embedding_block_size,
                                         SCALE_DTYPES[self.scale_dtype], full_range=self.embedding_bits == 4)


def quantize_tables(model: nn.Module, config: EmbeddingTables, ignore: tuple[str, ...], taken: set[int],
                    aliases: dict[int, list[str]], make_record) -> tuple[dict, list[dict]]:
    """The nn.Embedding tables not in `taken` (ids of weights a quantized Linear already shares: a tied table is
    left to that layer) nor ignored, quantized in place (the module keeps the dequantized values). Returns
    ({module name: record}, the report's entries); make_record(name, weight names, Quantized) builds a record."""
    quantized, records = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or id(module.weight) in taken or matches(name, ignore):
            continue
        table = module.weight.detach().float()
        q = quantize_rows(config.quantize, table, config.embedding_block_size != qp.PER_TENSOR)
        approx = qp.dequantize(q)
        module.weight.data = approx.to(module.weight.dtype)
        q = dataclasses.replace(q, codes=q.codes.to(torch.int16))
        quantized[name] = make_record(name, tuple(aliases.get(id(module.weight), [f"{name}.weight"])), q)
        taken.add(id(module.weight))
        records.append({"module": name, "shape": list(table.shape), "bits": q.bits,
                        "block_size": config.embedding_block_size, "relative_mse": qp.relative_mse(table, approx)})
    return quantized, records


def _check_lookup(q: qp.Quantized) -> None:
    if q.codebook is not None or q.block_size == qp.PER_TENSOR or q.offsets is not None:
        raise NotLowered("tied table: only int codes with per-channel or block scales and integer zero points are "
                         "lowered")


def _lookup_attrs(q: qp.Quantized) -> dict:
    """DequantizeLinear attributes for gathered rows [.., D]: per-channel scales read as one block of D."""
    return {"axis": -1, "block_size": q.codes.shape[1] if q.block_size == qp.PER_CHANNEL else q.block_size}


def table_initializers(name: str, q: qp.Quantized) -> tuple[list, dict]:
    """A table's codes [V, D], scales [V, D / B] (per-channel: [V]) and zero points as initializers (a table tied
    to a quantized Linear: the table's rows are the weight's rows, so that layer's codes serve the lookup too).
    Returns the initializers and the DequantizeLinear attributes for gathered rows [.., D]. NotLowered for codes
    the lookup cannot read."""
    _check_lookup(q)
    dtype = code_type(q)
    scale = q.scales.numpy()  # [V, groups]: per-channel has one group, read as one block of D
    initializers = [numpy_helper.from_array(q.codes.numpy().astype(dtype), f"{name}.codes"),
                    numpy_helper.from_array(scale, f"{name}.scale")]
    if q.zero_points is not None:
        initializers.append(numpy_helper.from_array(q.zero_points.numpy().astype(dtype), f"{name}.zero_point"))
    return initializers, _lookup_attrs(q)


def shared_table_nodes(weight: str, name: str, q: qp.Quantized) -> tuple[list, dict]:
    """tied_table=shared: the table's codes, scales and zero points (`name`.codes, ...) as the transposes of the tied
    Linear's own initializers (`weight`.codes [D, V], .scale [D / B, V] or per-channel [V], .zero_point, as
    int_weights.weight_nodes writes them), constants ONNX Runtime folds when the session starts. Returns the nodes
    and the DequantizeLinear attributes for gathered rows; NotLowered where table_initializers would be."""
    _check_lookup(q)
    parts = ["codes", "scale"] + (["zero_point"] if q.zero_points is not None else [])
    nodes = [helper.make_node("Transpose", [f"{weight}.codes"], [f"{name}.codes"], name=f"{name}.codes.Transpose",
                              perm=[1, 0])]
    for part in parts[1:]:
        if q.block_size == qp.PER_CHANNEL:  # [V] -> [V, 1]
            nodes.append(helper.make_node("Unsqueeze", [f"{weight}.{part}", f"{name}.unsqueeze_axes"],
                                          [f"{name}.{part}"], name=f"{name}.{part}.Unsqueeze"))
        else:
            nodes.append(helper.make_node("Transpose", [f"{weight}.{part}"], [f"{name}.{part}"],
                                          name=f"{name}.{part}.Transpose", perm=[1, 0]))
    if q.block_size == qp.PER_CHANNEL:
        nodes.insert(0, helper.make_node("Constant", [], [f"{name}.unsqueeze_axes"], name=f"{name}.UnsqueezeAxes",
                                         value=numpy_helper.from_array(np.array([1], np.int64))))
    return nodes, _lookup_attrs(q)


def lookup_nodes(name: str, gather: onnx.NodeProto, q: qp.Quantized, scale: onnx.TensorProto,
                 attrs: dict) -> tuple[list, str]:
    """The nodes that stand for `gather` (see the module doc). Returns them and how the table is read."""
    out, ids, tag = gather.output[0], gather.input[1], gather.name or gather.output[0]
    parts = ["codes", "scale"] + (["zero_point"] if q.zero_points is not None else [])
    scale_dtype = helper.tensor_dtype_to_np_dtype(scale.data_type)
    bits, block = container_bits(q.bits), attrs["block_size"]
    if bits == 4 and q.block_size > 0 and block >= 16 and block & (block - 1) == 0:
        inputs = [f"{name}.codes", ids, f"{name}.scale"] + ([f"{name}.zero_point"] if q.zero_points is not None else [])
        rows = out if scale_dtype == np.float32 else f"{out}.rows_fp16"
        nodes = [helper.make_node("GatherBlockQuantized", inputs, [rows], name=f"{tag}.GatherBlockQuantized",
                                  domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block)]
        if rows != out:
            nodes.append(helper.make_node("Cast", [rows], [out], name=f"{tag}.Cast", to=TensorProto.FLOAT))
        return nodes, "GatherBlockQuantized"
    if bits == 8:
        nodes = [helper.make_node("Gather", [f"{name}.{part}", ids], [f"{out}.{part}_rows"], name=f"{tag}.{part}",
                                  axis=0) for part in parts]
        return nodes + dequantize_node(f"{tag}.rows", [f"{out}.{part}_rows" for part in parts], out,
                                       scale_dtype, attrs), "gathered rows"
    table = f"{name}.table_dequantized"
    table_attrs = {"axis": 1, "block_size": block}
    nodes = dequantize_node(f"{tag}.table", [f"{name}.{part}" for part in parts], table, scale_dtype, table_attrs)
    return nodes + [helper.make_node("Gather", [table, ids], [out], name=f"{tag}.Gather", axis=0)], "whole table"

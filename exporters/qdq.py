"""Lower fake-quantized weights in an exported fp32 ONNX graph to k-bit storage.

The torch quantize pass leaves each quantized nn.Linear with its dequantized weight and a `quantized` record
(codes, scales, zero points, codebook). The fp32 export holds those weights transposed ([K, N]) as MatMul
initializers, sometimes concatenated by onnxsim (Q, K and V become one MatMul). We find each weight column by
its exact bytes, so renaming and concatenation do not matter, and replace the initializer with:

- int types: k-bit codes [K, N] (int2/int4/int8, or uint with a zero point) -> DequantizeLinear(axis 0,
  block_size B) -> MatMul, the pattern ONNX Runtime fuses into MatMulNBits (per-channel: axis 1 scales);
- float zero points (w = S * (q - z) + c per block, z the nearest integer zero point and c the fractional rest;
  DequantizeLinear's zero point is an integer): DequantizeLinear as above for S * (q - z), plus the rests' share
  x @ C = (x @ E) @ C_blocks, where E [K, K/B] sums x over each block and C_blocks [K/B, N] holds the rests: two
  small MatMuls (1/B of the main one's work) and an Add after the main MatMul, which ONNX Runtime still fuses
  into MatMulNBits;
- codebook types: uint indices [K, N] -> Cast(int32) -> Gather(codebook) -> Mul(block scales) -> MatMul. ONNX
  Runtime has no k-bit kernel for these: it constant-folds them back to fp32 at session start (small file, fp32
  speed and memory).
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from passes.model_bits import container_bits
from passes.quant_primitives import PER_CHANNEL, PER_TENSOR, Quantized

INT2_OPSET, INT2_IR_VERSION = 25, 11  # int2/uint2 exist from opset 25 (IR 11) on
SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}


@dataclass
class _Column:
    quantized: Quantized
    row: int  # the output row of the torch weight this ONNX column is


def _column_index(model: nn.Module) -> dict[bytes, _Column]:
    index = {}
    for module in model.modules():
        q = getattr(module, "quantized", None)
        if q is None:
            continue
        weight = module.weight.detach().float().numpy()
        for row in range(weight.shape[0]):
            index[weight[row].tobytes()] = _Column(q, row)
    return index


def _kind(q: Quantized) -> tuple:
    """Columns can share one ONNX weight only if they are stored the same way."""
    codebook_kind = None if q.codebook is None else ("row" if q.codebook.dim() == 2 else q.codebook.shape[0])
    return (q.bits, q.block_size, q.scales.dtype, q.zero_points is not None, q.offsets is not None, codebook_kind)


def _per_column(columns: list[_Column], field: str) -> np.ndarray:
    """Stack one field of each column's torch row: [N, ...] (rows of the torch weight = ONNX columns)."""
    return np.stack([getattr(c.quantized, field)[c.row].numpy() if getattr(c.quantized, field).shape[0] > 1
                     else getattr(c.quantized, field)[0].numpy() for c in columns])


def _scale_tensor(columns: list[_Column], block_size: int) -> np.ndarray:
    """[K/B, N] for blocks, [N] per-channel, scalar per-tensor; in the stored scale dtype."""
    if block_size == PER_TENSOR:
        values = {float(c.quantized.scales.reshape(-1)[0]) for c in columns}
        if len(values) != 1:
            raise _Skip("per-tensor scales of concatenated weights differ")
        return columns[0].quantized.scales.reshape(()).numpy()
    per_row = _per_column(columns, "scales")  # [N, groups]
    return per_row[:, 0] if block_size == PER_CHANNEL else np.ascontiguousarray(per_row.T)


class _Skip(Exception):
    pass


def _int_nodes(name: str, columns: list[_Column], out: str) -> tuple[list, list]:
    q = columns[0].quantized
    width = container_bits(q.bits)
    codes = np.ascontiguousarray(_per_column(columns, "codes").T)  # [K, N]
    asymmetric = q.zero_points is not None
    dtype = (UNSIGNED if asymmetric else SIGNED)[width]
    scale = _scale_tensor(columns, q.block_size)
    initializers = [numpy_helper.from_array(codes.astype(dtype), f"{name}.codes"),
                    numpy_helper.from_array(scale, f"{name}.scale")]
    inputs = [f"{name}.codes", f"{name}.scale"]
    if asymmetric:
        zero = _per_column(columns, "zero_points")
        zero = zero[:, 0] if q.block_size == PER_CHANNEL else np.ascontiguousarray(zero.T)
        if q.block_size == PER_TENSOR:
            zero = zero.reshape(-1)[0].reshape(())
        initializers.append(numpy_helper.from_array(zero.astype(dtype), f"{name}.zero_point"))
        inputs.append(f"{name}.zero_point")
    attrs = {}
    if q.block_size > 0:
        attrs = {"axis": 0, "block_size": q.block_size}
    elif q.block_size == PER_CHANNEL:
        attrs = {"axis": 1}
    dequant_out = out if scale.dtype == np.float32 else f"{name}.dequant_fp16"
    nodes = [helper.make_node("DequantizeLinear", inputs, [dequant_out], name=f"{name}.DequantizeLinear", **attrs)]
    if dequant_out != out:
        nodes.append(helper.make_node("Cast", [dequant_out], [out], name=f"{name}.Cast", to=TensorProto.FLOAT))
    return nodes, initializers


def _gather_table_nodes(name: str, rows: list[_Column], out: str) -> tuple[list, list]:
    """An embedding table tied to a quantized Linear (e.g. an LM's lm_head): the table's rows are the weight's
    rows, so its codes [V, D] and scales [V, D / B] dequantize along axis 1 in front of the Gather."""
    q = rows[0].quantized
    if q.codebook is not None or q.block_size == PER_TENSOR or q.offsets is not None:
        raise _Skip("tied table: only int codes with per-channel or block scales and integer zero points are "
                    "lowered")
    dtype = (UNSIGNED if q.zero_points is not None else SIGNED)[container_bits(q.bits)]
    per_channel = q.block_size == PER_CHANNEL
    scale = _per_column(rows, "scales")
    initializers = [numpy_helper.from_array(_per_column(rows, "codes").astype(dtype), f"{name}.codes"),
                    numpy_helper.from_array(scale[:, 0] if per_channel else scale, f"{name}.scale")]
    inputs = [f"{name}.codes", f"{name}.scale"]
    if q.zero_points is not None:
        zero = _per_column(rows, "zero_points")
        initializers.append(numpy_helper.from_array((zero[:, 0] if per_channel else zero).astype(dtype),
                                                    f"{name}.zero_point"))
        inputs.append(f"{name}.zero_point")
    attrs = {"axis": 0} if per_channel else {"axis": 1, "block_size": q.block_size}
    dequant_out = out if scale.dtype == np.float32 else f"{name}.dequant_fp16"
    nodes = [helper.make_node("DequantizeLinear", inputs, [dequant_out], name=f"{name}.DequantizeLinear", **attrs)]
    if dequant_out != out:
        nodes.append(helper.make_node("Cast", [dequant_out], [out], name=f"{name}.Cast", to=TensorProto.FLOAT))
    return nodes, initializers


def _tied_table_rows(table: np.ndarray, model: nn.Module) -> list[_Column] | None:
    """The rows of the quantized Linear weight that `table` equals (a tied embedding), or None. Compared whole,
    not row by row: identical rows (unused tokens) would otherwise point at each other."""
    for module in model.modules():
        q = getattr(module, "quantized", None)
        if q is not None and tuple(module.weight.shape) == table.shape and np.array_equal(
                module.weight.detach().float().numpy(), table):
            return [_Column(q, row) for row in range(table.shape[0])]
    return None


def _offset_nodes(name: str, columns: list[_Column], x: str, block_sums: str | None, main_out: str,
                  out: str) -> tuple[list, list]:
    """out = main_out + (x @ E) @ C_blocks: the float zero points' share of the product (see the module doc).
    `block_sums` names an x @ E already computed for the same input and block size (Q, K and V share one)."""
    q = columns[0].quantized
    offsets = np.ascontiguousarray(_per_column(columns, "offsets").T)  # [K/B, N]
    nodes, initializers = [], [numpy_helper.from_array(offsets, f"{name}.offsets")]
    offsets_name = f"{name}.offsets"
    if offsets.dtype != np.float32:
        nodes.append(helper.make_node("Cast", [offsets_name], [f"{name}.offsets32"], name=f"{name}.OffsetCast",
                                      to=TensorProto.FLOAT))
        offsets_name = f"{name}.offsets32"
    if block_sums is None:
        cols = q.codes.shape[1]
        block_of = np.arange(cols) // q.block_size
        sums = np.zeros((cols, offsets.shape[0]), np.float32)
        sums[np.arange(cols), block_of] = 1.0
        block_sums = f"{name}.block_sums"
        initializers.append(numpy_helper.from_array(sums, f"{name}.block_sum_matrix"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.block_sum_matrix"], [block_sums],
                                      name=f"{name}.BlockSum"))
    nodes += [helper.make_node("MatMul", [block_sums, offsets_name], [f"{name}.offset_term"], name=f"{name}.Offsets"),
              helper.make_node("Add", [main_out, f"{name}.offset_term"], [out], name=f"{name}.AddOffsets")]
    return nodes, initializers


def _codebook_nodes(name: str, columns: list[_Column], out: str) -> tuple[list, list]:
    q = columns[0].quantized
    indices = np.ascontiguousarray(_per_column(columns, "codes").T)  # [K, N]
    rows, cols = indices.shape
    tables = [c.quantized.codebook if c.quantized.codebook.dim() == 1 else c.quantized.codebook[c.row]
              for c in columns]
    shared = all(t is tables[0] or np.array_equal(t.numpy(), tables[0].numpy()) for t in tables)
    codebook = (tables[0].numpy() if shared else np.concatenate([t.numpy() for t in tables])).astype(np.float32)
    initializers = [numpy_helper.from_array(indices.astype(UNSIGNED[container_bits(q.bits)]), f"{name}.indices"),
                    numpy_helper.from_array(codebook, f"{name}.codebook")]
    nodes = [helper.make_node("Cast", [f"{name}.indices"], [f"{name}.index32"], name=f"{name}.Cast",
                              to=TensorProto.INT32)]
    index = f"{name}.index32"
    if not shared:  # one codebook per column, laid end to end: column j's entries start at j * C
        size = tables[0].shape[0]
        offsets = (np.arange(cols, dtype=np.int32) * size)[None, :]
        initializers.append(numpy_helper.from_array(offsets, f"{name}.codebook_offsets"))
        nodes.append(helper.make_node("Add", [index, f"{name}.codebook_offsets"], [f"{name}.flat_index"],
                                      name=f"{name}.Add"))
        index = f"{name}.flat_index"
    nodes.append(helper.make_node("Gather", [f"{name}.codebook", index], [f"{name}.normalized"],
                                  name=f"{name}.Gather"))
    scale = _scale_tensor(columns, q.block_size)
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


def lower_to_qdq(proto: onnx.ModelProto, model: nn.Module) -> tuple[onnx.ModelProto, dict]:
    """Replace every MatMul weight that is a quantized Linear's (or several, concatenated) with k-bit storage.
    Returns the new model and a record: which initializers were lowered, and which were left fp32 and why."""
    index = _column_index(model)
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    new_nodes, new_inits, lowered, left = [], [], [], []
    after: dict[int, list] = {}  # nodes that read the MatMul's input or output go right after it
    block_sums: dict[tuple[str, int], str] = {}
    for position, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight_name = node.input[1]
        weight = numpy_helper.to_array(initializers[weight_name])
        if weight.ndim != 2 or weight.dtype != np.float32:
            continue
        columns = [index.get(col.tobytes()) for col in np.ascontiguousarray(weight.T)]
        if not any(columns):
            continue
        if not all(columns) or len({_kind(c.quantized) for c in columns}) != 1:
            left.append({"initializer": weight_name, "reason": "mixes quantized and other columns"})
            continue
        name = f"{weight_name}.q"
        out = f"{weight_name}.dequantized"
        try:
            build = _int_nodes if columns[0].quantized.codebook is None else _codebook_nodes
            nodes, inits = build(name, columns, out)
        except _Skip as exc:
            left.append({"initializer": weight_name, "reason": str(exc)})
            continue
        new_nodes += nodes
        new_inits += inits
        node.input[1] = out
        q = columns[0].quantized
        if q.offsets is not None:
            key = (node.input[0], q.block_size)
            final_out = node.output[0]
            node.output[0] = f"{name}.main"
            offset_nodes, offset_inits = _offset_nodes(name, columns, node.input[0], block_sums.get(key),
                                                       node.output[0], final_out)
            block_sums.setdefault(key, f"{name}.block_sums")
            after[position] = offset_nodes
            new_inits += offset_inits
        lowered.append({"initializer": weight_name, "shape": list(weight.shape), "bits": q.bits,
                        **({"float_zero_points": True} if q.offsets is not None else {})})
    for node in graph.node:  # embedding tables tied to a quantized Linear share its codes
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        table_name = node.input[0]
        table = numpy_helper.to_array(initializers[table_name])
        rows = _tied_table_rows(table, model) if table.ndim == 2 and table.dtype == np.float32 else None
        if rows is None:
            continue
        try:
            nodes, inits = _gather_table_nodes(f"{table_name}.q", rows, f"{table_name}.dequantized")
        except _Skip as exc:
            left.append({"initializer": table_name, "reason": str(exc)})
            continue
        new_nodes += nodes
        new_inits += inits
        node.input[0] = f"{table_name}.dequantized"
        lowered.append({"initializer": table_name, "shape": list(table.shape), "bits": rows[0].quantized.bits,
                        "tied_table": True})
    still_used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    nodes = [n for position, node in enumerate(graph.node) for n in [node] + after.get(position, [])]
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # new nodes read only initializers: first is topologically safe
    if any(container_bits(entry["bits"]) == 2 for entry in lowered):
        for opset in proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, INT2_OPSET)
        proto.ir_version = max(proto.ir_version, INT2_IR_VERSION)
    return proto, {"lowered": lowered, "left_fp32": left}

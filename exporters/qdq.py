"""Lower fake-quantized weights in an exported fp32 ONNX graph to k-bit storage.

The quantize pass hands over one record per quantized nn.Linear (passes.quantize.QuantizedLayer: codes, scales,
zero points or codebook, keyed by module name) and leaves the module holding the dequantized weight. The fp32
export holds that weight transposed ([K, N]) as a MatMul initializer named after the module
(exporters.onnx_export names them `<module>.weight`); an ONNX input's weights keep their own names, which the
records carry. Each record is placed by name, checked against the dequantized values, and only where no name
matches by value (an initializer equal to the dequantized weight). A record that lands nowhere is an error
naming the layer: nothing is left fp32 silently. The initializer is replaced with:

- int types: k-bit codes [K, N] (int2/int4/int8, or uint with a zero point) -> DequantizeLinear(axis 0,
  block_size B) -> MatMul, the pattern ONNX Runtime fuses into MatMulNBits (per-channel: axis 1 scales);
- float zero points (w = S * (q - z) + c per block, z the nearest integer zero point and c the fractional rest;
  DequantizeLinear's zero point is an integer): DequantizeLinear as above for S * (q - z), plus the rests' share
  x @ C = (x @ E) @ C_blocks, where E [K, K/B] sums x over each block and C_blocks [K/B, N] holds the rests: two
  small MatMuls (1/B of the main one's work) and an Add after the main MatMul. E is stored as k-bit codes of
  the main weight's kind (0/1 levels, scale 1: exact), so ONNX Runtime runs it as a MatMulNBits too and
  exporters.pack folds it into the main weight's kernel (one call computes x @ W and the block sums);
- codebook types: uint indices [K, N] -> Cast(int32) -> Gather(codebook) -> Mul(block scales) -> MatMul. ONNX
  Runtime has no k-bit kernel for these: it constant-folds them back to fp32 at session start (small file, fp32
  speed and memory).
"""
import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters.activation_qdq import fold_smoothing_into_norms, quantize_matmul_inputs
from passes.model_bits import container_bits
from passes.quant_primitives import PER_CHANNEL, PER_TENSOR, Quantized, dequantize
from passes.quantize import QuantizedLayer

INT2_OPSET, INT2_IR_VERSION = 25, 11  # int2/uint2 exist from opset 25 (IR 11) on
SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}


class LoweringError(ValueError):
    """A quantization record the exported graph has no place for (names the layer)."""


def _by_column(field: torch.Tensor, block_size: int) -> np.ndarray:
    """A per-row field of the torch weight ([N, groups]) laid out for the ONNX weight [K, N]: [K/B, N] for blocks,
    [N] per-channel, a scalar per-tensor."""
    values = field.numpy()
    if block_size == PER_TENSOR:
        return values.reshape(-1)[0].reshape(())
    return values[:, 0] if block_size == PER_CHANNEL else np.ascontiguousarray(values.T)


class _Skip(Exception):
    pass


def _dequantize_node(name: str, inputs: list[str], out: str, scale_dtype: np.dtype, attrs: dict) -> list:
    """DequantizeLinear into `out` (float32; a float16 scale dequantizes to float16, then a Cast)."""
    dequant_out = out if scale_dtype == np.float32 else f"{name}.dequant_fp16"
    nodes = [helper.make_node("DequantizeLinear", inputs, [dequant_out], name=f"{name}.DequantizeLinear", **attrs)]
    if dequant_out != out:
        nodes.append(helper.make_node("Cast", [dequant_out], [out], name=f"{name}.Cast", to=TensorProto.FLOAT))
    return nodes


def _int_nodes(name: str, q: Quantized, out: str) -> tuple[list, list]:
    """Codes [K, N] -> DequantizeLinear (axis 0 blocks / axis 1 per-channel / per-tensor) -> out."""
    dtype = (UNSIGNED if q.zero_points is not None else SIGNED)[container_bits(q.bits)]
    scale = _by_column(q.scales, q.block_size)
    initializers = [numpy_helper.from_array(np.ascontiguousarray(q.codes.numpy().T).astype(dtype), f"{name}.codes"),
                    numpy_helper.from_array(scale, f"{name}.scale")]
    inputs = [f"{name}.codes", f"{name}.scale"]
    if q.zero_points is not None:
        initializers.append(numpy_helper.from_array(_by_column(q.zero_points, q.block_size).astype(dtype),
                                                    f"{name}.zero_point"))
        inputs.append(f"{name}.zero_point")
    attrs = {"axis": 0, "block_size": q.block_size} if q.block_size > 0 else \
        {"axis": 1} if q.block_size == PER_CHANNEL else {}
    return _dequantize_node(name, inputs, out, scale.dtype, attrs), initializers


def _gather_table_initializers(name: str, q: Quantized) -> tuple[list, dict]:
    """An embedding table tied to a quantized Linear (e.g. an LM's lm_head): the table's rows are the weight's
    rows, so its codes [V, D], scales [V, D / B] (per-channel: [V]) and zero points serve the lookup too.
    Returns the initializers and the DequantizeLinear attributes for gathered rows [.., D]."""
    if q.codebook is not None or q.block_size == PER_TENSOR or q.offsets is not None:
        raise _Skip("tied table: only int codes with per-channel or block scales and integer zero points are "
                    "lowered")
    dtype = (UNSIGNED if q.zero_points is not None else SIGNED)[container_bits(q.bits)]
    per_channel = q.block_size == PER_CHANNEL
    scale = q.scales.numpy()  # [V, groups]: per-channel has one group, read as one block of D
    initializers = [numpy_helper.from_array(q.codes.numpy().astype(dtype), f"{name}.codes"),
                    numpy_helper.from_array(scale, f"{name}.scale")]
    if q.zero_points is not None:
        initializers.append(numpy_helper.from_array(q.zero_points.numpy().astype(dtype), f"{name}.zero_point"))
    block = q.codes.shape[1] if per_channel else q.block_size
    return initializers, {"axis": -1, "block_size": block}


def _gathered_rows_nodes(name: str, gather: onnx.NodeProto, q: Quantized, scale: onnx.TensorProto,
                         attrs: dict) -> tuple[list, str]:
    """What stands for Gather(table, ids), so that only the looked-up rows are dequantized (a DequantizeLinear of
    the whole table would run on every call, the Gather's input being a graph input's function):
    - 4-bit codes in power-of-two blocks of >= 16: com.microsoft GatherBlockQuantized (ONNX Gather takes no int4);
    - 8-bit codes: Gather(codes), Gather(scales) (, zero points) -> DequantizeLinear over the rows' last axis;
    - anything else (int4 per-channel or odd blocks, int2): DequantizeLinear of the table, then the Gather.
    Returns the nodes and how the table is read."""
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
        return nodes + _dequantize_node(f"{tag}.rows", [f"{out}.{part}_rows" for part in parts], out,
                                        scale_dtype, attrs), "gathered rows"
    table = f"{name}.table_dequantized"
    table_attrs = {"axis": 1, "block_size": block}
    nodes = _dequantize_node(f"{tag}.table", [f"{name}.{part}" for part in parts], table, scale_dtype, table_attrs)
    return nodes + [helper.make_node("Gather", [table, ids], [out], name=f"{tag}.Gather", axis=0)], "whole table"


def _block_sum_nodes(name: str, q: Quantized, x: str, out: str) -> tuple[list, list]:
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
    nodes = _dequantize_node(f"{name}.block_sum", [t.name for t in initializers], weight, scale_dtype,
                             {"axis": 0, "block_size": q.block_size})
    nodes.append(helper.make_node("MatMul", [x, weight], [out], name=f"{name}.BlockSum"))
    return nodes, initializers


def _offset_nodes(name: str, q: Quantized, x: str, block_sums: str | None, main_out: str,
                  out: str) -> tuple[list, list, list]:
    """out = main_out + (x @ E) @ C_blocks: the float zero points' share of the product (see the module doc).
    `block_sums` names an x @ E already computed for the same input and block size (Q, K and V share one).
    Returns the nodes that go before the main MatMul (x @ E: packed, it then leads the weights, so that the main
    outputs stay side by side for merge_adds_over_splits), the nodes after it and the initializers."""
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
    return ahead, nodes, initializers


def _codebook_nodes(name: str, q: Quantized, out: str) -> tuple[list, list]:
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
    scale = _by_column(q.scales, q.block_size)
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


class _Weights:
    """2-D fp32 initializers by name, read into arrays only when compared (a model's weights are not copied
    wholesale); `transposed` names those the graph reads through Transpose (a tied weight, see below)."""

    def __init__(self, tensors: dict[str, onnx.TensorProto], transposed: set[str] = frozenset()):
        self.tensors, self.transposed = tensors, set(transposed)

    def shape(self, name: str) -> list[int]:
        dims = list(self.tensors[name].dims)
        return dims[::-1] if name in self.transposed else dims

    def array(self, name: str) -> np.ndarray:
        array = numpy_helper.to_array(self.tensors[name])
        return array.T if name in self.transposed else array

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def _place(layer: QuantizedLayer, weight: np.ndarray, candidates: _Weights, kind: str) -> list[str]:
    """The initializers that hold `layer`'s weight (`weight`, laid out as they store it): by name first (a name
    that matches must also hold the values), else every one equal in value (the checked fallback)."""
    named = [n for n in (layer.module, *layer.weight_names) if n in candidates]
    for name in named:
        if not np.array_equal(candidates.array(name), weight):
            raise LoweringError(f"quantized layer {layer.module!r}: {kind} initializer {name!r} has its name but "
                                f"not its dequantized values (shape {candidates.shape(name)})")
    if named:
        return named[:1]
    return [n for n in candidates.tensors if candidates.shape(n) == list(weight.shape)
            and np.array_equal(candidates.array(n), weight)]


def _fp32_initializers(proto: onnx.ModelProto, op_type: str, position: int) -> dict[str, onnx.TensorProto]:
    """The 2-D fp32 initializers that `op_type` nodes read at input `position`, by name."""
    initializers = {init.name: init for init in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type == op_type and len(node.input) > position and node.input[position] in initializers:
            init = initializers[node.input[position]]
            if init.data_type == TensorProto.FLOAT and len(init.dims) == 2:
                found[init.name] = init
    return found


def _matmul_weights(proto: onnx.ModelProto) -> tuple[_Weights, dict[str, str]]:
    """The MatMul weights [K, N]: 2-D fp32 initializers read directly, and those read through a Transpose (the
    exporter's form of a tied weight, e.g. an LM head sharing the embedding table [V, D]: listed under the
    table's name). Also {Transpose output: table name} for the second kind."""
    direct = _fp32_initializers(proto, "MatMul", 1)
    tables = {t.name: t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    matmul_inputs = {node.input[1] for node in proto.graph.node if node.op_type == "MatMul"}
    through = {}
    for node in proto.graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if (node.op_type == "Transpose" and node.input[0] in tables and node.output[0] in matmul_inputs
                and perm in ([], [[1, 0]]) and node.input[0] not in direct):
            through[node.output[0]] = node.input[0]
    return _Weights({**direct, **{name: tables[name] for name in through.values()}}, set(through.values())), through


def lower_to_qdq(proto: onnx.ModelProto, layers: dict[str, QuantizedLayer]) -> tuple[onnx.ModelProto, dict]:
    """Replace the MatMul weight of every record in `layers` (and an embedding table tied to it) with k-bit
    storage. Returns the new model and a record: which initializers were lowered, from which layer and how they
    were found, and which tied tables stayed fp32 and why. LoweringError names a record with no MatMul weight."""
    graph = proto.graph
    matmul_weights, through_transpose = _matmul_weights(proto)
    gather_tables = _Weights(_fp32_initializers(proto, "Gather", 0))
    weight_of, table_of, lowered, left = {}, {}, [], []
    for layer in layers.values():
        weight = dequantize(layer.quantized).numpy()
        if layer.embedding:  # an nn.Embedding table of its own: read by Gather only
            tables = _place(layer, weight, gather_tables, "Gather table")
            if not tables:
                raise LoweringError(f"quantized embedding {layer.module!r} ({list(weight.shape)}) matches no Gather "
                                    f"table of the exported graph")
            table_of.update({name: layer for name in tables})
            continue
        places = _place(layer, np.ascontiguousarray(weight.T), matmul_weights, "MatMul weight")
        if not places:
            raise LoweringError(f"quantized layer {layer.module!r} ({list(weight.shape)}) matches no MatMul weight of "
                                f"the exported graph (a Linear on 2-D input exports as Gemm, which is not lowered)")
        by_name = places[0] in (layer.module, *layer.weight_names)
        for name in places:
            weight_of[name] = (layer, "name" if by_name else "value")
        for name in _place(layer, weight, gather_tables, "Gather table"):
            table_of[name] = layer
    new_nodes, new_inits = [], []
    ahead: dict[int, list] = {}  # nodes that read the MatMul's input go right before it
    after: dict[int, list] = {}  # and those that read its output right after it
    block_sums: dict[tuple[str, int], str] = {}
    activation_at = {}  # MatMul position -> how its input is quantized (W8A8 layers)
    built = set()
    for position, node in enumerate(graph.node):
        weight_name = through_transpose.get(node.input[1], node.input[1]) if node.op_type == "MatMul" else None
        if weight_name not in weight_of:
            continue
        layer, found_by = weight_of[weight_name]
        q, name, out = layer.quantized, f"{weight_name}.q", f"{weight_name}.dequantized"
        if weight_name not in built:  # a weight read by several MatMuls is stored once
            build = _int_nodes if q.codebook is None else _codebook_nodes
            nodes, inits = build(name, q, out)
            new_nodes += nodes
            new_inits += inits
            built.add(weight_name)
            lowered.append({"initializer": weight_name, "module": layer.module, "found_by": found_by,
                            "shape": matmul_weights.shape(weight_name), "bits": q.bits,
                            **({"float_zero_points": True} if q.offsets is not None else {})})
        node.input[1] = out
        if layer.activation is not None:
            activation_at[position] = layer.activation
        if q.offsets is not None:
            key = (node.input[0], q.block_size)
            final_out = node.output[0]
            node.output[0] = f"{name}.main.{position}"
            sum_nodes, offset_nodes, offset_inits = _offset_nodes(f"{name}.{position}", q, node.input[0],
                                                                  block_sums.get(key), node.output[0], final_out)
            block_sums.setdefault(key, f"{name}.{position}.block_sums")
            ahead[position], after[position] = sum_nodes, offset_nodes
            new_inits += offset_inits
    table_parts: dict[str, tuple] = {}
    replaced: dict[int, list] = {}  # Gather nodes of tied tables, by position: the nodes that stand for them
    for position, node in enumerate(graph.node):  # embedding tables tied to a quantized Linear share its codes
        if node.op_type != "Gather" or node.input[0] not in table_of:
            continue
        table_name, layer = node.input[0], table_of[node.input[0]]
        if table_name not in table_parts:
            try:
                inits, attrs = _gather_table_initializers(f"{table_name}.table_q", layer.quantized)
            except _Skip as exc:
                left.append({"initializer": table_name, "module": layer.module, "reason": str(exc)})
                table_of = {k: v for k, v in table_of.items() if k != table_name}
                continue
            new_inits += inits
            table_parts[table_name] = (attrs, inits[1])
            found_by = ("name" if table_name in (layer.module, *layer.weight_names) else "value") \
                if layer.embedding else "tied"
            lowered.append({"initializer": table_name, "module": layer.module, "found_by": found_by,
                            "shape": gather_tables.shape(table_name), "bits": layer.quantized.bits,
                            ("embedding" if layer.embedding else "tied_table"): True})
        attrs, scale = table_parts[table_name]
        replaced[position], read_as = _gathered_rows_nodes(f"{table_name}.table_q", node, layer.quantized, scale,
                                                           attrs)
        next(e for e in lowered if e["initializer"] == table_name and (e.get("tied_table") or e.get("embedding"))
             )["lookup"] = read_as
    before, activation_inits = quantize_matmul_inputs(graph, activation_at)
    new_inits += activation_inits
    nodes = [n for position, node in enumerate(graph.node)
             for n in ahead.get(position, []) + before.get(position, []) + replaced.get(position, [node])
             + after.get(position, [])]
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    dead = {out for out in through_transpose if out not in read}  # a tied weight's Transpose, bypassed above
    nodes = [n for n in nodes if not (n.op_type == "Transpose" and n.output[0] in dead)]
    still_used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # new nodes read only initializers: first is topologically safe
    folded = fold_smoothing_into_norms(proto) if any(a.smooth is not None for a in activation_at.values()) else 0
    if any(node.domain == "com.microsoft" for node in graph.node) and \
            "com.microsoft" not in {opset.domain for opset in proto.opset_import}:
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if any(container_bits(entry["bits"]) == 2 for entry in lowered):
        for opset in proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, INT2_OPSET)
        proto.ir_version = max(proto.ir_version, INT2_IR_VERSION)
    record = {"lowered": lowered, "left_fp32": left}
    if activation_at:
        record["activations"] = {"matmuls": len(activation_at), "smoothing_folded_into_norms": folded}
    return proto, record

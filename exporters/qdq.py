"""Place the quantize pass's records in an exported fp32 ONNX graph: each record's weight becomes the k-bit
storage its scheme writes (passes.quantize: int_weights, codebook, embeddings, activations own their ONNX forms).

The quantize pass hands over one record per quantized nn.Linear (passes.quantize.QuantizedLayer: codes, scales,
zero points or codebook, keyed by module name, with the scheme that made them) and leaves the module holding the
dequantized weight. The fp32 export holds that weight transposed ([K, N]) as a MatMul initializer named after the
module (exporters.onnx_export names them `<module>.weight`); an ONNX input's weights keep their own names, which
the records carry. Each record is placed by name, checked against the dequantized values, and only where no name
matches by value (an initializer equal to the dequantized weight). A record that lands nowhere is an error
naming the layer: nothing is left fp32 silently. An embedding table tied to a quantized Linear is read through
that layer's codes (passes.quantize.embeddings); an activation-quantized layer gets its input's Q/DQ
(exporters.activation_qdq).
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.activation_qdq import fold_smoothing_into_norms, quantize_matmul_inputs
from passes.model_bits import container_bits
from passes.quant_primitives import dequantize, row_chunks
from passes.quantize import QuantizedLayer
from passes.quantize.embeddings import NotLowered, lookup_nodes, shared_table_nodes, table_initializers

INT2_OPSET, INT2_IR_VERSION = 25, 11  # int2/uint2 exist from opset 25 (IR 11) on


class LoweringError(ValueError):
    """A quantization record the exported graph has no place for (names the layer)."""


class _Weights:
    """2-D fp32 initializers by name, read into arrays only when compared (a model's weights are not copied
    wholesale); `transposed` names those the graph reads through Transpose (a tied weight, see below)."""

    def __init__(self, tensors: dict[str, onnx.TensorProto], transposed: set[str] = frozenset()):
        self.tensors, self.transposed = tensors, set(transposed)

    def shape(self, name: str) -> list[int]:
        dims = list(self.tensors[name].dims)
        return dims[::-1] if name in self.transposed else dims

    def array(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if tensor.HasField("raw_data"):  # a read-only view of the stored bytes: no copy of a large weight
            array = np.frombuffer(tensor.raw_data, dtype=np.float32).reshape(tuple(tensor.dims))
        else:
            array = numpy_helper.to_array(tensor)
        return array.T if name in self.transposed else array

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


class _Dequantized:
    """A record's dequantized weight [N, K] (`transposed`: laid out [K, N], as MatMul weights are), compared with
    stored arrays a few rows at a time: never made whole (a 150k-vocabulary head is 0.9 GB in fp32)."""

    def __init__(self, q, transposed: bool = False):
        self.q, self.transposed = q, transposed

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.q.codes.shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def T(self) -> "_Dequantized":
        return _Dequantized(self.q, not self.transposed)

    def equals(self, stored: np.ndarray) -> bool:
        if tuple(stored.shape) != self.shape:
            return False
        for rows, part in row_chunks(self.q):
            values = dequantize(part).numpy()
            if not np.array_equal(stored[:, rows] if self.transposed else stored[rows],
                                  values.T if self.transposed else values):
                return False
        return True


def _place(layer: QuantizedLayer, weight: _Dequantized, candidates: _Weights, kind: str) -> list[str]:
    """The initializers that hold `layer`'s weight (`weight`, laid out as they store it): by name first (a name
    that matches must also hold the values), else every one equal in value (the checked fallback)."""
    named = [n for n in (layer.module, *layer.weight_names) if n in candidates]
    for name in named:
        if not weight.equals(candidates.array(name)):
            raise LoweringError(f"quantized layer {layer.module!r}: {kind} initializer {name!r} has its name but "
                                f"not its dequantized values (shape {candidates.shape(name)})")
    if named:
        return named[:1]
    return [n for n in candidates.tensors if candidates.shape(n) == list(weight.shape)
            and weight.equals(candidates.array(n))]


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
        weight = _Dequantized(layer.quantized)
        if layer.embedding:  # an nn.Embedding table of its own: read by Gather only
            tables = _place(layer, weight, gather_tables, "Gather table")
            if not tables:
                raise LoweringError(f"quantized embedding {layer.module!r} ({list(weight.shape)}) matches no Gather "
                                    f"table of the exported graph")
            table_of.update({name: layer for name in tables})
            continue
        places = _place(layer, weight.T, matmul_weights, "MatMul weight")
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
    weight_of_module: dict[str, str] = {}  # module -> the prefix of its lowered weight's initializers
    for position, node in enumerate(graph.node):
        weight_name = through_transpose.get(node.input[1], node.input[1]) if node.op_type == "MatMul" else None
        if weight_name not in weight_of:
            continue
        layer, found_by = weight_of[weight_name]
        q, name, out = layer.quantized, f"{weight_name}.q", f"{weight_name}.dequantized"
        if weight_name not in built:  # a weight read by several MatMuls is stored once
            nodes, inits = layer.scheme.lower(name, q, out)
            new_nodes += nodes
            new_inits += inits
            built.add(weight_name)
            weight_of_module.setdefault(layer.module, name)
            lowered.append({"initializer": weight_name, "module": layer.module, "found_by": found_by,
                            "shape": matmul_weights.shape(weight_name), "bits": q.bits,
                            **({"float_zero_points": True} if q.offsets is not None else {})})
        node.input[1] = out
        if layer.activation is not None:
            activation_at[position] = layer.activation
        key = (node.input[0], q.block_size)  # what the scheme may share between MatMuls of one input
        main_out = f"{name}.main.{position}"
        sum_nodes, extra_nodes, extra_inits, shared = layer.scheme.lower_around_matmul(
            f"{name}.{position}", q, node.input[0], main_out, node.output[0], block_sums.get(key))
        if extra_nodes:  # the MatMul's result goes through them
            node.output[0] = main_out
            block_sums.setdefault(key, shared)
            ahead[position], after[position] = sum_nodes, extra_nodes
            new_inits += extra_inits
    table_parts: dict[str, tuple] = {}
    replaced: dict[int, list] = {}  # Gather nodes of tied tables, by position: the nodes that stand for them
    for position, node in enumerate(graph.node):  # embedding tables tied to a quantized Linear share its codes
        if node.op_type != "Gather" or node.input[0] not in table_of:
            continue
        table_name, layer = node.input[0], table_of[node.input[0]]
        if table_name not in table_parts:
            shared = layer.tied_table == "shared" and not layer.embedding and layer.module in weight_of_module
            try:
                if shared:  # the Linear's codes, read through Transposes ONNX Runtime folds: stored once
                    weight = weight_of_module[layer.module]
                    nodes, attrs = shared_table_nodes(weight, f"{table_name}.table_q", layer.quantized)
                    scale = next(init for init in new_inits if init.name == f"{weight}.scale")
                else:
                    inits, attrs = table_initializers(f"{table_name}.table_q", layer.quantized)
                    scale = inits[1]
            except NotLowered as exc:
                left.append({"initializer": table_name, "module": layer.module, "reason": str(exc)})
                table_of = {k: v for k, v in table_of.items() if k != table_name}
                continue
            if shared:
                new_nodes += nodes
            else:
                new_inits += inits
            table_parts[table_name] = (attrs, scale)
            found_by = ("name" if table_name in (layer.module, *layer.weight_names) else "value") \
                if layer.embedding else "tied"
            lowered.append({"initializer": table_name, "module": layer.module, "found_by": found_by,
                            "shape": gather_tables.shape(table_name), "bits": layer.quantized.bits,
                            ("embedding" if layer.embedding else "tied_table"): True,
                            **({"stored_with": layer.module} if shared else {})})
        attrs, scale = table_parts[table_name]
        replaced[position], read_as = lookup_nodes(f"{table_name}.table_q", node, layer.quantized, scale, attrs)
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

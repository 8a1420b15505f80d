"""Pack sibling MatMuls (several Linears reading the same activation: a decoder's q/k/v, a gated MLP's gate/up)
into one MatMul over their weights laid side by side, then Split its output back into theirs.

One wider kernel instead of two or three narrow ones: at decode time (one token, M = 1) each MatMulNBits call
costs a thread-pool round trip, which is what a 135M model's 7 calls per layer are made of. Weights are packed
only where the pieces store alike: fp32 initializers [K, N_i], or DequantizeLinear of integer codes [K, N_i] with
the same code type, axis, block size and zero-point presence (scales and zero points [K/B, N_i] or [N_i]
concatenate along N, so every column keeps its own scale). The packed weight is still DequantizeLinear ->
MatMul, which ONNX Runtime fuses into one MatMulNBits. Anything else (codebooks, a weight read twice) is left
as it is. Values are unchanged: concatenation only.

Float zero points (exporters.qdq) pack too: their block-sum weight joins the main weights' kernel and their
offset MatMuls pack among themselves; the per-member Adds of main and offset terms then become one Add before
the Split (merge_adds_over_splits), so a packed q/k/v costs one Add, not three; so do constant biases
(merge_bias_adds_over_splits). A packed q/k/v that only GroupQueryAttention reads goes to it unsplit: the op
takes packed QKV in its query input (feed_packed_qkv_to_attention), as ONNX Runtime GenAI's models feed it.
"""
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters import graph_index


def _weight_kind(weight: str, producers: dict, initializers: dict, consumers: dict):
    """('fp32', (init,)) or ('dq', (codes, scale, zero_point | None), dq node, attrs) or None."""
    if weight in initializers:
        init = initializers[weight]
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(init.dims) == 2 \
                and len(consumers[weight]) == 1:
            return ("fp32", init.data_type), [init], None
        return None
    node = producers.get(weight)
    if node is None or node.op_type != "DequantizeLinear" or len(consumers[weight]) != 1:
        return None
    inputs = [initializers.get(name) for name in node.input]
    if any(i is None for i in inputs) or len(inputs[0].dims) != 2:
        return None
    attrs = graph_index.attributes(node)
    if attrs.get("axis", 1) == 0 and "block_size" not in attrs:
        return None
    if "axis" not in attrs and "block_size" not in attrs and len(inputs[1].dims) == 0:
        return None  # per-tensor: one scale each, not concatenable
    key = ("dq", inputs[0].data_type, inputs[1].data_type, len(inputs), attrs.get("axis"), attrs.get("block_size"),
           tuple(len(i.dims) for i in inputs))
    if any(len(consumers[name]) != 1 for name in node.input):
        return None
    return key, inputs, node


def pack_parallel_matmuls(proto: onnx.ModelProto) -> int:
    """Rewrite `proto` in place; returns how many MatMuls were folded into others."""
    graph = proto.graph
    initializers = graph_index.initializers(graph)
    producers = graph_index.producers(graph)
    consumers = graph_index.consumers(graph)
    groups = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        kind = _weight_kind(node.input[1], producers, initializers, consumers)
        if kind is not None:
            groups[(node.input[0], kind[0])].append((node, kind))
    packed, removed_nodes, removed_inits, new_inits, replacements = 0, set(), set(), [], {}
    for (activation, key), members in groups.items():
        if len(members) < 2:
            continue
        first_node = members[0][0]
        name = f"{first_node.output[0]}.packed"
        widths = []
        if key[0] == "fp32":
            arrays = [numpy_helper.to_array(kind[1][0]) for _, kind in members]
            widths = [a.shape[1] for a in arrays]
            new_inits.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}.weight"))
            weight_out, extra_nodes = f"{name}.weight", []
            removed_inits |= {kind[1][0].name for _, kind in members}
        else:
            parts = list(zip(*[kind[1] for _, kind in members]))  # (codes...), (scales...), (zero points...)
            codes = [numpy_helper.to_array(c) for c in parts[0]]
            widths = [c.shape[1] for c in codes]
            names = [f"{name}.codes", f"{name}.scale", f"{name}.zero_point"][:len(parts)]
            for tensors, packed_name in zip(parts, names):
                arrays = [numpy_helper.to_array(t) for t in tensors]
                new_inits.append(numpy_helper.from_array(np.concatenate(arrays, axis=-1), packed_name))
                removed_inits |= {t.name for t in tensors}
            dq = members[0][1][2]
            weight_out = f"{name}.dequantized"
            extra_nodes = [helper.make_node("DequantizeLinear", names, [weight_out], name=f"{name}.DequantizeLinear",
                                            **graph_index.attributes(dq))]
            removed_nodes |= {id(kind[2]) for _, kind in members}
        split_name = f"{name}.split"
        new_inits.append(numpy_helper.from_array(np.asarray(widths, np.int64), split_name))
        extra_nodes += [helper.make_node("MatMul", [activation, weight_out], [f"{name}.out"], name=f"{name}.MatMul"),
                        helper.make_node("Split", [f"{name}.out", split_name], [m.output[0] for m, _ in members],
                                         name=f"{name}.Split", axis=-1)]
        replacements[id(first_node)] = extra_nodes
        removed_nodes |= {id(m) for m, _ in members[1:]}
        packed += len(members) - 1
    if not packed:
        return 0
    # DequantizeLinear nodes of packed weights read only initializers; the new one goes where the first MatMul was
    _rewrite(graph, replacements, removed_nodes, removed_inits, new_inits)
    merge_adds_over_splits(proto)
    merge_bias_adds_over_splits(proto)
    feed_packed_qkv_to_attention(proto)
    return packed


def _split_widths(node: onnx.NodeProto, initializers: dict) -> list[int] | None:
    """The widths of a last-axis Split whose sizes are an initializer, else None."""
    if node.op_type != "Split" or graph_index.attributes(node).get("axis") != -1 or len(node.input) != 2 \
            or node.input[1] not in initializers:
        return None
    return [int(w) for w in numpy_helper.to_array(initializers[node.input[1]])]


def merge_adds_over_splits(proto: onnx.ModelProto) -> int:
    """Add(a_i, b_i) for every piece b_i of a Split B, where the a_i are consecutive pieces of another Split A
    with the same widths (each piece read by its Add alone) -> A yields them as one piece, one Add of that piece
    and B's input, then a Split into the Adds' outputs. Elementwise, so values are unchanged. Returns how many
    Adds were removed."""
    graph = proto.graph
    initializers = graph_index.initializers(graph)
    producers = graph_index.producers(graph)
    consumers = graph_index.consumers(graph)
    position = {id(node): index for index, node in enumerate(graph.node)}
    removed, replaced, before, new_inits, merged, old_sizes = set(), {}, {}, [], 0, set()
    for b in graph.node:
        b_widths = _split_widths(b, initializers)
        if b_widths is None or len(b.output) < 2 or id(b) in removed:
            continue
        adds = [consumers[out][0] if len(consumers[out]) == 1 else None for out in b.output]
        if any(add is None or add.op_type != "Add" for add in adds):
            continue
        partners = [add.input[0] if add.input[1] == out else add.input[1] for add, out in zip(adds, b.output)]
        a = producers.get(partners[0])
        a_widths = _split_widths(a, initializers) if a is not None else None
        if a_widths is None or id(a) in removed or id(a) in replaced:
            continue
        first = list(a.output).index(partners[0])
        run = list(a.output[first:first + len(partners)])
        if run != partners or a_widths[first:first + len(partners)] != b_widths \
                or any(len(consumers[out]) != 1 for out in run):
            continue
        name = f"{b.name}.merged"
        main = a.input[0] if len(run) == len(a.output) else f"{name}.main"  # A split only these: no Split left
        replaced[id(a)] = []
        if main != a.input[0]:
            pieces = list(a.output[:first]) + [main] + list(a.output[first + len(run):])
            widths = a_widths[:first] + [sum(b_widths)] + a_widths[first + len(run):]
            new_inits.append(numpy_helper.from_array(np.asarray(widths, np.int64), f"{name}.split_a"))
            replaced[id(a)] = [helper.make_node("Split", [a.input[0], f"{name}.split_a"], pieces,
                                                name=f"{name}.SplitA", axis=-1)]
        earliest = min(adds, key=lambda add: position[id(add)])  # the first reader of an Add's output follows it
        before[id(earliest)] = [helper.make_node("Add", [main, b.input[0]], [f"{name}.sum"],
                                                name=f"{name}.Add"),
                               helper.make_node("Split", [f"{name}.sum", b.input[1]],
                                                [add.output[0] for add in adds], name=f"{name}.Split", axis=-1)]
        removed |= {id(b)} | {id(add) for add in adds}
        old_sizes.add(a.input[1])
        merged += len(adds) - 1
    if merged:
        _rewrite(graph, replaced, removed, old_sizes, new_inits, before)
    return merged


def merge_bias_adds_over_splits(proto: onnx.ModelProto) -> int:
    """Add(piece_i, bias_i) for every piece of a last-axis Split, each bias a 1-D initializer of the piece's
    width read by that Add alone -> one Add of the concatenated biases before the Split. Returns Adds removed."""
    graph = proto.graph
    initializers = graph_index.initializers(graph)
    consumers = graph_index.consumers(graph)
    replaced, removed, dropped, new_inits, merged = {}, set(), set(), [], 0
    for split in graph.node:
        widths = _split_widths(split, initializers)
        if widths is None or len(split.output) < 2:
            continue
        adds = [consumers[out][0] if len(consumers[out]) == 1 else None for out in split.output]
        if any(add is None or add.op_type != "Add" for add in adds):
            continue
        biases = [add.input[1] if add.input[0] == out else add.input[0] for add, out in zip(adds, split.output)]
        if any(b not in initializers or len(consumers[b]) != 1 or list(initializers[b].dims) != [w]
               or initializers[b].data_type != initializers[biases[0]].data_type for b, w in zip(biases, widths)):
            continue
        name = f"{split.name}.bias"
        new_inits.append(numpy_helper.from_array(
            np.concatenate([numpy_helper.to_array(initializers[b]) for b in biases]), name))
        replaced[id(split)] = [
            helper.make_node("Add", [split.input[0], name], [f"{name}.sum"], name=f"{name}.Add"),
            helper.make_node("Split", [f"{name}.sum", split.input[1]], [add.output[0] for add in adds],
                             name=split.name, axis=-1)]
        removed |= {id(add) for add in adds}
        dropped |= set(biases)
        merged += len(adds) - 1
    if merged:
        _rewrite(graph, replaced, removed, dropped, new_inits)
    return merged


def feed_packed_qkv_to_attention(proto: onnx.ModelProto) -> int:
    """Split(packed) -> q, k, v read only as GroupQueryAttention's first three inputs -> the op reads `packed` as
    its query and no key/value (its packed-QKV form: widths num_heads * head, then kv heads twice). Returns how
    many Splits went."""
    graph = proto.graph
    initializers = graph_index.initializers(graph)
    consumers = graph_index.consumers(graph)
    producers = graph_index.producers(graph)
    removed, sizes, fed = set(), set(), 0
    for attention in graph.node:
        if attention.op_type != "GroupQueryAttention" or len(attention.input) < 3:
            continue
        split = producers.get(attention.input[0])
        widths = _split_widths(split, initializers) if split is not None else None
        if widths is None or list(split.output) != list(attention.input[:3]) \
                or any(consumers[out] != [attention] for out in split.output):
            continue
        attrs = graph_index.attributes(attention)
        heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
        if widths[1] != widths[2] or widths[0] * kv_heads != widths[1] * heads:
            continue
        attention.input[0], attention.input[1], attention.input[2] = split.input[0], "", ""
        removed.add(id(split))
        sizes.add(split.input[1])
        fed += 1
    if fed:
        _rewrite(graph, {}, removed, sizes, [])
    return fed


def _rewrite(graph, replaced: dict, removed: set, dropped: set, new_inits: list, before: dict | None = None) -> None:
    """Nodes by id: `replaced` ones swapped for their lists in place, `removed` ones dropped, `before` lists put
    ahead of their node; initializers named in `dropped` go unless a node still reads them, `new_inits` are added."""
    nodes = []
    for node in graph.node:
        nodes += (before or {}).get(id(node), [])
        if id(node) in replaced:
            nodes += replaced[id(node)]
        elif id(node) not in removed:
            nodes.append(node)
    read = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(nodes)

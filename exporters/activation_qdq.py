"""Activation Q/DQ placed in front of the MatMuls of W8A8 layers (passes.quantize.activations decides and owns
the nodes of one quantized input; this places them in the graph).

- SmoothQuant's division x / s: a Mul by 1/s before the quantization, folded into the scale and bias of the
  LayerNormalization that produces x when nothing else reads that output (pre-norm blocks); a post-norm block
  (BERT's LayerNorm output is also its residual) keeps the Mul.
MatMuls reading the same tensor with the same setting (q/k/v) share one quantization of it. The pipeline then
writes each such MatMul as the integer kernel itself with its bias inside (exporters.integer_matmul).
"""
import hashlib
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters import graph_index
from passes.quantize.activations import ActivationQuant, activation_nodes

NORMS = {"LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1, None),
         "SkipLayerNormalization": (2, 3), "SkipSimplifiedLayerNormalization": (2, None)}  # (gamma, beta) inputs


def _key(x: str, quant: ActivationQuant) -> tuple:
    smooth = None if quant.smooth is None else hashlib.sha256(quant.smooth.numpy().tobytes()).hexdigest()
    return x, quant.mode, quant.dtype, quant.scale, quant.zero_point, smooth


def quantize_matmul_inputs(graph: onnx.GraphProto, settings: dict[int, ActivationQuant]) -> tuple[dict, list]:
    """For the MatMuls at the given node positions: rewires each to read its quantized input. Returns
    ({position: nodes that must precede it}, new initializers)."""
    before, inits, done = defaultdict(list), [], {}
    for position in sorted(settings):
        node, quant = graph.node[position], settings[position]
        key = _key(node.input[0], quant)
        if key not in done:
            name = f"{node.input[0]}.act_q{len(done)}"
            nodes, new_inits, out = activation_nodes(name, node.input[0], quant)
            before[position] += nodes
            inits += new_inits
            done[key] = out
        node.input[0] = done[key]
    return before, inits


def fold_smoothing_into_norms(proto: onnx.ModelProto) -> int:
    """Mul(norm output, 1/s) -> the norm's gamma and beta divided by s, where the norm's output is read by
    such Muls only (with one s) and its gamma / beta by that norm only. Returns how many Muls were folded."""
    graph = proto.graph
    initializers = graph_index.initializers(graph)
    producers = graph_index.producers(graph)
    consumers = graph_index.consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    folded, removed = 0, set()
    renames = {}
    for norm_out, readers in list(consumers.items()):
        norm = producers.get(norm_out)
        if norm is None or norm.op_type not in NORMS or norm.output[0] != norm_out or norm_out in graph_outputs:
            continue
        if not all(r.op_type == "Mul" and r.name.endswith(".smooth") and r.input[0] == norm_out for r in readers):
            continue
        scales = {r.input[1] for r in readers}
        arrays = [numpy_helper.to_array(initializers[s]) for s in scales if s in initializers]
        if len(arrays) != len(scales) or any(not np.array_equal(a, arrays[0]) for a in arrays):
            continue
        gamma_at, beta_at = NORMS[norm.op_type]
        params = [norm.input[i] for i in (gamma_at, beta_at) if i is not None and i < len(norm.input) and norm.input[i]]
        if any(p not in initializers or len(consumers[p]) != 1 for p in params):
            continue
        for p in params:
            tensor = initializers[p]
            tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * arrays[0]).astype(
                helper.tensor_dtype_to_np_dtype(tensor.data_type)), p))
        for r in readers:
            renames[r.output[0]] = norm_out
            removed.add(id(r))
            folded += 1
    if not folded:
        return 0
    kept = [n for n in graph.node if id(n) not in removed]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    read = {name for node in kept for name in node.input}
    inits = [t for t in graph.initializer if t.name in read]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return folded

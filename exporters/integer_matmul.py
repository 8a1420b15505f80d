"""W8A8 MatMuls written as ONNX Runtime's integer kernels themselves, with their bias Adds inside them.

The lowered graph (exporters.activation_qdq) holds each W8A8 Linear as QDQ:

    static:  QuantizeLinear(x) -> xq -> DequantizeLinear -> MatMul(., DequantizeLinear(W)) [-> Add(bias)]
    dynamic: DynamicQuantizeLinear(x) -> xq, s, z -> DequantizeLinear -> MatMul(., DequantizeLinear(W)) [-> Add]

ONNX Runtime's CPU QDQ transformer turns the MatMul into com.microsoft MatMulIntegerToFloat /
DynamicQuantizeMatMul but leaves the bias as a float Add on its output: one more op, and one more pass over
the activations, per Linear. Both kernels take the bias as an input, so this writes them directly:

    static:  QuantizeLinear(x) -> MatMulIntegerToFloat(xq, W, x scale, W scale, x zero point, W zero point, bias)
    dynamic: DynamicQuantizeMatMul(x, W, W scale, W zero point, bias)        (x quantized for this MatMul only)
             MatMulIntegerToFloat(xq, W, s, W scale, z, W zero point, bias)  (codes shared by q/k/v)

Same arithmetic (int32 accumulation, both scales on the result, then the float bias), so values are unchanged.
Only a 1-D float32 initializer of the output's width counts as a bias; other Adds stay where they are.
"""
import onnx
from onnx import TensorProto, helper

from exporters.graph_index import attributes, consumers, initializers, producers

MS = "com.microsoft"


def fuse_integer_matmuls(proto: onnx.ModelProto) -> dict[str, int]:
    """Rewrites `proto` in place; returns {"integer_matmuls": n, "biases_fused": m}."""
    graph = proto.graph
    inits, makers, readers = initializers(graph), producers(graph), consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    replaced, removed, fused, biases = {}, set(), 0, 0
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        activation, weight = (makers.get(name) for name in matmul.input)
        if not (_is_dq(activation) and _is_dq(weight)) or not _per_channel_integer_weight(weight, inits):
            continue
        quantizer = makers.get(activation.input[0])
        if quantizer is None or quantizer.op_type not in ("QuantizeLinear", "DynamicQuantizeLinear") \
                or len(readers[weight.output[0]]) != 1:
            continue
        out, bias = matmul.output[0], ""
        add = readers[out][0] if len(readers[out]) == 1 and out not in graph_outputs else None
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == out else add.input[0]
            width = _width(weight, inits)
            if _is_vector(inits.get(other), width):
                bias, out = other, add.output[0]
                removed.add(id(add))
                biases += 1
        w_codes, w_scale = weight.input[0], weight.input[1]
        w_zero = weight.input[2] if len(weight.input) > 2 else ""
        name = f"{matmul.name or out}.integer"
        if quantizer.op_type == "DynamicQuantizeLinear" and _only_reader(activation, matmul, readers):
            node = helper.make_node("DynamicQuantizeMatMul", [quantizer.input[0], w_codes, w_scale, w_zero, bias],
                                    [out], name=name, domain=MS)
        else:
            x_codes, x_scale, x_zero = (activation.input[i] if i < len(activation.input) else "" for i in range(3))
            node = helper.make_node("MatMulIntegerToFloat", [x_codes, w_codes, x_scale, w_scale, x_zero, w_zero, bias],
                                    [out], name=name, domain=MS)
        _trim_optional_tail(node)
        replaced[id(matmul)] = node
        removed.add(id(weight))
        fused += 1
    if not fused:
        return {"integer_matmuls": 0, "biases_fused": 0}
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in removed]
    nodes = _drop_unread(nodes, graph_outputs, {"DequantizeLinear", "DynamicQuantizeLinear"})
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if MS not in {opset.domain for opset in proto.opset_import}:
        proto.opset_import.append(helper.make_opsetid(MS, 1))
    return {"integer_matmuls": fused, "biases_fused": biases}


def _is_dq(node) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")


def _per_channel_integer_weight(dq, inits: dict) -> bool:
    """int8/uint8 codes [K, N] with a scalar or per-column ([N], axis 1) scale: what the integer kernels take."""
    codes, scale = (inits.get(name) for name in dq.input[:2])
    if codes is None or scale is None or len(codes.dims) != 2 \
            or codes.data_type not in (TensorProto.INT8, TensorProto.UINT8) or scale.data_type != TensorProto.FLOAT:
        return False
    if len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits:
        return False
    attrs = attributes(dq)
    if "block_size" in attrs and attrs["block_size"]:
        return False
    return len(scale.dims) == 0 or (list(scale.dims) == [codes.dims[1]] and attrs.get("axis", 1) in (1, -1))


def _width(dq, inits: dict) -> int:
    return inits[dq.input[0]].dims[1]


def _is_vector(tensor, width: int) -> bool:
    return tensor is not None and tensor.data_type == TensorProto.FLOAT and list(tensor.dims) == [width]


def _only_reader(activation_dq, matmul, readers) -> bool:
    """The DynamicQuantizeLinear's codes feed this MatMul alone (through one DequantizeLinear)."""
    codes = activation_dq.input[0]
    return readers[activation_dq.output[0]] == [matmul] and readers[codes] == [activation_dq]


def _trim_optional_tail(node) -> None:
    while node.input and not node.input[-1]:
        node.input.pop()


def _drop_unread(nodes: list, graph_outputs: set, kinds: set) -> list:
    """Drops nodes of `kinds` whose outputs nobody reads (the bypassed activation Q/DQ), until none is left."""
    while True:
        read = {name for node in nodes for name in node.input} | graph_outputs
        kept = [n for n in nodes if n.op_type not in kinds or any(out in read for out in n.output if out)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept

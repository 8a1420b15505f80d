"""exporters.pack: sibling MatMuls on one activation become one MatMul + Split, values unchanged, k-bit weights
still one MatMulNBits each."""
import numpy as np
import onnx

from compressor.inputs.checkpoint import load_checkpoint
from compressor.inputs.decoders import as_decoder
from compressor.ort_runtime import create_session, logits_fn
from compressor.validate import EXACT_MATMULNBITS
from exporters.decoder_graph import build_decoder_graph
from exporters.pack import pack_parallel_matmuls
from exporters.qdq import lower_to_qdq
from passes.quantize import QuantizeConfig, quantize_model


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _assert_topologically_sorted(proto):
    """ONNX requires every node's inputs to be made before it (ONNX Runtime re-sorts; other runtimes may not)."""
    known = {t.name for t in proto.graph.initializer} | {i.name for i in proto.graph.input} | {""}
    for node in proto.graph.node:
        missing = [name for name in node.input if name not in known]
        assert not missing, f"{node.name} reads {missing} before they are made"
        known.update(node.output)


def _assert_every_initializer_is_read(proto):
    """ONNX Runtime warns at every session start about each initializer no node reads."""
    read = {name for node in proto.graph.node for name in node.input}
    assert not [t.name for t in proto.graph.initializer if t.name not in read]


def test_packed_decoder_gives_the_same_logits(shipped, tmp_path, optimized_ops):
    model = load_checkpoint(shipped / "gpt-xs").model.eval()
    record = quantize_model(model, QuantizeConfig(bits=4, block_size=32), None)
    proto, _ = lower_to_qdq(build_decoder_graph(as_decoder(model)), record["quantized"])
    plain = proto.SerializeToString()
    plain_adds = _ops(proto).count("Add")
    assert pack_parallel_matmuls(proto) == 2 * 2  # per block: k and v folded into q's MatMul
    onnx.checker.check_model(proto)
    _assert_topologically_sorted(proto)
    _assert_every_initializer_is_read(proto)
    assert _ops(proto).count("MatMul") == 13 - 4
    attention = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert "Split" not in _ops(proto) and all(list(n.input[1:3]) == ["", ""] for n in attention)  # packed QKV
    assert _ops(proto).count("Add") == plain_adds - 2 * 2  # per block: one bias Add for q/k/v, not three
    ids = {"input_ids": np.random.default_rng(0).integers(0, 256, (2, 20))}
    before = logits_fn(create_session(plain, options=EXACT_MATMULNBITS))(ids)
    after = logits_fn(create_session(proto.SerializeToString(), options=EXACT_MATMULNBITS))(ids)
    np.testing.assert_array_equal(before, after)  # exact kernels: concatenation changes nothing
    path = tmp_path / "packed.onnx"
    onnx.save(proto, path)
    ops, bits = optimized_ops(path, tmp_path)
    assert ops["MatMulNBits"] == 9 and "MatMul" not in ops and bits == [4] * 9


def test_unlike_siblings_are_left_alone(shipped):
    model = load_checkpoint(shipped / "gpt-xs").model.eval()
    config = QuantizeConfig(bits=4, block_size=32, overrides={"re:.*k_proj": {"bits": 8, "block_size": 0}})
    record = quantize_model(model, config, None)
    proto, _ = lower_to_qdq(build_decoder_graph(as_decoder(model)), record["quantized"])
    assert pack_parallel_matmuls(proto) == 2  # q and v pack; k (8-bit per-channel) stays on its own


def test_float_zero_points_pack_with_their_block_sums_and_add_once(shipped, tmp_path, optimized_ops):
    """q4_1-style weights: each input's block sums x @ E join its main weights' MatMulNBits (E is 0/1 codes), the
    offset MatMuls pack among themselves and q/k/v's three offset Adds become one before the Split. Exact kernels:
    the same logits as the unpacked graph, bit for bit."""
    model = load_checkpoint(shipped / "gpt-xs").model.eval()
    config = QuantizeConfig(bits=4, block_size=32, symmetric=False, zero_point="float")
    record = quantize_model(model, config, None)
    proto, _ = lower_to_qdq(build_decoder_graph(as_decoder(model)), record["quantized"])
    plain = proto.SerializeToString()
    unpacked = _ops(proto)
    linears = len(record["quantized"])
    assert unpacked.count("MatMul") == 3 * linears - 2 * 2  # main, block sums (q/k/v share one), offsets
    pack_parallel_matmuls(proto)
    onnx.checker.check_model(proto)
    _assert_topologically_sorted(proto)
    _assert_every_initializer_is_read(proto)
    ops = _ops(proto)
    inputs_read = linears - 2 * 2  # q/k/v read one input
    assert ops.count("MatMul") == 2 * inputs_read  # one kernel (weights + block sums) and one offset MatMul each
    assert ops.count("Add") == unpacked.count("Add") - 2 * 2 * 2  # per block: one offset and one bias Add for q/k/v
    ids = {"input_ids": np.random.default_rng(0).integers(0, 256, (2, 20))}
    before = logits_fn(create_session(plain, options=EXACT_MATMULNBITS))(ids)
    after = logits_fn(create_session(proto.SerializeToString(), options=EXACT_MATMULNBITS))(ids)
    np.testing.assert_array_equal(before, after)
    path = tmp_path / "packed.onnx"
    onnx.save(proto, path)
    optimized, _ = optimized_ops(path, tmp_path)
    assert optimized["MatMulNBits"] == inputs_read and optimized.get("DequantizeLinear", 0) == 0


def test_adds_merge_only_over_matching_pieces():
    """merge_adds_over_splits needs the Adds' pieces side by side in A with B's widths; otherwise nothing moves."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(a_widths, b_widths):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, sum(a_widths)])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, sum(b_widths)])
        a_out, b_out = [f"a{i}" for i in range(len(a_widths))], [f"b{i}" for i in range(len(b_widths))]
        nodes = [helper.make_node("Split", ["x", "wa"], a_out, axis=-1),
                 helper.make_node("Split", ["y", "wb"], b_out, axis=-1)]
        for i in reversed(range(len(b_widths))):  # the last piece's Add first, its reader right after it
            nodes += [helper.make_node("Add", [a_out[i + 1], b_out[i]], [f"s{i}"]),
                      helper.make_node("Relu", [f"s{i}"], [f"z{i}"])]
        outs = [helper.make_tensor_value_info(f"z{i}", TensorProto.FLOAT, [1, w]) for i, w in enumerate(b_widths)]
        outs.append(helper.make_tensor_value_info("a0", TensorProto.FLOAT, [1, a_widths[0]]))
        inits = [numpy_helper.from_array(np.asarray(a_widths, np.int64), "wa"),
                 numpy_helper.from_array(np.asarray(b_widths, np.int64), "wb")]
        return helper.make_model(helper.make_graph(nodes, "g", [x, y], outs, inits),
                                 opset_imports=[helper.make_opsetid("", 18)])

    from exporters.pack import merge_adds_over_splits
    rng = np.random.default_rng(0)
    proto = graph([2, 3, 4], [3, 4])
    feed = {"x": rng.standard_normal((1, 9), dtype=np.float32), "y": rng.standard_normal((1, 7), dtype=np.float32)}
    before = create_session(proto.SerializeToString()).run(None, feed)
    assert merge_adds_over_splits(proto) == 1
    onnx.checker.check_model(proto)
    _assert_topologically_sorted(proto)
    assert _ops(proto).count("Add") == 1
    for want, got in zip(before, create_session(proto.SerializeToString()).run(None, feed)):
        np.testing.assert_array_equal(want, got)
    assert merge_adds_over_splits(graph([2, 4, 3], [3, 4])) == 0  # widths differ piece by piece

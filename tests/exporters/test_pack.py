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


def test_packed_decoder_gives_the_same_logits(shipped, tmp_path, optimized_ops):
    model = load_checkpoint(shipped / "gpt-xs").model.eval()
    record = quantize_model(model, QuantizeConfig(bits=4, block_size=32), None)
    proto, _ = lower_to_qdq(build_decoder_graph(as_decoder(model)), record["quantized"])
    plain = proto.SerializeToString()
    assert pack_parallel_matmuls(proto) == 2 * 2  # per block: k and v folded into q's MatMul
    onnx.checker.check_model(proto)
    assert _ops(proto).count("MatMul") == 13 - 4 and _ops(proto).count("Split") == 2
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

"""W8A8 artifacts: ONNX Runtime runs every quantized Linear in an integer kernel (proved on its optimized graph),
each kernel computes exactly what the fake-quantized torch layer computes, SmoothQuant leaves the float function
unchanged and folds into pre-norm LayerNorms, and quantized embedding tables are looked up as stored."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.inputs.checkpoint import load_checkpoint
from compressor.ort_runtime import create_session, to_ort_feeds
from compressor.tasks import TASKS
from compressor.torch_logits import torch_logits_fn
from compressor.validate import EXACT_MATMULNBITS, parity
from exporters.qdq import lower_to_qdq
from passes import activation_primitives as ap
from passes.hooks import dividing_inputs
from passes.quantize.activations import ActivationQuant
from passes.smoothquant import SmoothQuantConfig, smooth_layers, smoothquant_model
from passes.quant_primitives import dequantize
from passes.quantize import QuantizeConfig, QuantizedLayer, quantize_model
from passes.quantize.activations import IntegerActivations
from passes.quantize.int_weights import IntWeights
from passes import quant_primitives as qp

W8A8 = QuantizeConfig(bits=7, block_size=0, activations="static")


def _decoder_artifact(shipped, tmp_path, config: QuantizeConfig, smoothquant: SmoothQuantConfig | None = None):
    """gpt-xs quantized with `config` (smoothed first with `smoothquant`) and written as the pipeline writes GPT
    samples (the KV-cache decoder graph, built directly: no torch.onnx tracing), unpacked: (checkpoint, task,
    held-out data, record, lowering, path)."""
    from compressor.inputs.decoders import as_decoder
    from exporters.decoder_graph import build_decoder_graph
    from exporters.onnx_export import finalize

    checkpoint = load_checkpoint(shipped / "gpt-xs")
    task = TASKS[checkpoint.family]
    calibration = task.calibration_data(checkpoint.config, 16) if config.needs_calibration else None
    if smoothquant is not None:
        smoothquant_model(checkpoint.model, smoothquant, calibration)
    record = quantize_model(checkpoint.model, config, calibration)
    proto, lowering = lower_to_qdq(build_decoder_graph(as_decoder(checkpoint.model)), record["quantized"])
    path = tmp_path / "artifact.onnx"
    onnx.save(finalize(proto, {}), str(path))
    return checkpoint, task, task.heldout_data(checkpoint.config, 8), record, lowering, path
LAYER_TOLERANCE = 1e-5  # an integer GEMM is exact; only the float scaling of its int32 result rounds


def _one_linear(weight: np.ndarray) -> onnx.ModelProto:
    """x [B, S, K] @ weight [K, N] (the exported form of an nn.Linear holding the dequantized weight)."""
    k, n = weight.shape
    weight = numpy_helper.from_array(weight, "layer.weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "layer.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("weights", ["int8, 7 bits", "uint8, 8 bits"])
@pytest.mark.parametrize("mode, dtype", [("static", "uint8"), ("static", "int8"), ("dynamic", "uint8")])
def test_each_integer_kernel_is_the_fake_quantized_layer_exactly(tmp_path, mode, dtype, weights):
    """Weights whose every column reaches its extreme level: 7-bit int8 codes (the presets') or 8-bit ones stored as
    uint8 cannot saturate ONNX Runtime's 16-bit pair sums on any x86 CPU (full-range 8-bit int8 codes do on AVX2
    without VNNI, which is what the development machine has; see QuantizeConfig.integer_weights)."""
    k, n = 384, 1536
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.05
    x = torch.randn(2, 64, k) * 2
    if weights.startswith("int8"):
        q = qp.quantize_int_symmetric(weight, 7, qp.PER_CHANNEL)
    else:
        q = IntegerActivations(integer_weights="uint8").stored_weights(qp.quantize_int_symmetric(weight, 8, qp.PER_CHANNEL))
    if mode == "static":
        scale, zero = ap.static_qparams(float(x.min()), float(x.max()), dtype)
        quant = ActivationQuant("static", dtype, scale, zero)
        expected = ap.fake_quantize(x, scale, zero, dtype) @ dequantize(q).T
    else:
        quant = ActivationQuant("dynamic")
        expected = ap.fake_quantize_dynamic(x) @ dequantize(q).T
    proto, record = lower_to_qdq(_one_linear(np.ascontiguousarray(dequantize(q).numpy().T)), {"layer": QuantizedLayer("layer", ("layer.weight",), q, IntWeights(bits=8, block_size=0), quant)})
    assert record["activations"]["matmuls"] == 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ("MatMulIntegerToFloat" if mode == "static" else "DynamicQuantizeMatMul") in ops and "MatMul" not in ops
    got = session.run(None, {"x": x.numpy()})[0]
    assert parity(expected.numpy(), got, LAYER_TOLERANCE)["passed"]


@pytest.mark.parametrize("config, kernel", [(W8A8, "MatMulIntegerToFloat"),
                                            (QuantizeConfig(bits=7, block_size=0, activations="dynamic"),
                                             "DynamicQuantizeMatMul")], ids=["static", "dynamic"])
def test_every_linear_runs_in_an_integer_kernel(optimized_ops, shipped, tmp_path, config, kernel):
    checkpoint, task, data, record, lowering, path = _decoder_artifact(shipped, tmp_path, config)
    linears = len(record["layers"])
    assert len(record["activations"]) == linears and lowering["activations"]["matmuls"] == linears
    ops, _ = optimized_ops(path, tmp_path)
    # dynamic: where one DynamicQuantizeLinear feeds q, k and v, the other two read its codes in MatMulIntegerToFloat
    assert ops[kernel] > 0 and ops["MatMulIntegerToFloat"] + ops["DynamicQuantizeMatMul"] == linears, ops
    # nothing is left in a float GEMM (attention is GroupQueryAttention in the decoder graph)
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    assert not [n.name for n in optimized.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits")]
    assert ops["GroupQueryAttention"] == checkpoint.config["layers"]
    inputs = task.parity_inputs(data)
    quantized = record["quantized"]
    torch_logits = torch_logits_fn(checkpoint.model, task.INPUT_NAMES, quantized)(inputs)
    session = create_session(path)
    ort_logits = session.run(None, to_ort_feeds(inputs, session))[0]
    assert parity(torch_logits, ort_logits, 0.15)["passed"]  # validate.Tolerances' W8A8 bound (measured ~2e-2)
    weights_only = torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs)
    assert not np.allclose(weights_only, torch_logits)  # the torch column does quantize the activations


def test_static_ranges_come_from_calibration_data_and_observers_differ(shipped):
    checkpoint = load_checkpoint(shipped / "gpt-xs")
    task = TASKS[checkpoint.family]
    calibration = task.calibration_data(checkpoint.config, 8)
    ranges = {}
    for observer in ("minmax", "percentile", "mse"):
        model = load_checkpoint(shipped / "gpt-xs").model
        record = quantize_model(model, QuantizeConfig(bits=7, block_size=0, activations="static",
                                                      activation_observer=observer, activation_percentile=99.0),
                                calibration)
        ranges[observer] = {a["module"]: a["range"] for a in record["activations"]}
        for entry in record["activations"]:
            low, high = entry["observed"]
            assert low <= entry["range"][0] <= entry["range"][1] <= high
    widths = {o: sum(hi - lo for lo, hi in r.values()) for o, r in ranges.items()}
    assert widths["percentile"] < widths["minmax"] and widths["mse"] <= widths["minmax"]


def test_smoothquant_keeps_the_float_function_and_folds_into_pre_norms(shipped):
    checkpoint = load_checkpoint(shipped / "gpt-xs")
    task = TASKS[checkpoint.family]
    model = checkpoint.model
    data = task.heldout_data(checkpoint.config, 4)
    inputs = task.parity_inputs(data)
    before = torch_logits_fn(model, task.INPUT_NAMES)(inputs)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    smooth = smooth_layers(model, layers, task.calibration_data(checkpoint.config, 4), alpha=0.5)
    # q/k/v share one input, so one smoothing vector; the weights now hold W * s
    block = "blocks.0.attn"
    names = [n for n in layers if n.startswith(block) and n.split(".")[-1] in ("q", "k", "v", "query", "key", "value")]
    assert len({id(smooth[n]) for n in names}) <= 1
    with dividing_inputs(layers, smooth):
        after = torch_logits_fn(model, task.INPUT_NAMES)(inputs)
    assert parity(before, after, 1e-5)["passed"]


def test_smoothquant_leaves_a_tied_lm_head_alone(shipped):
    """An lm_head that shares its weight with the token embedding (SmolLM2, most small LLMs) is not smoothed:
    W * s would scale the embedding rows as well and wreck the model (SmolLM2 W8A8 perplexity 25.4 -> 22,382
    before this). The other layers still are, and the float function is kept."""
    checkpoint = load_checkpoint(shipped / "gpt-xs")
    task = TASKS[checkpoint.family]
    model = checkpoint.model
    model.lm_head.weight = model.token_emb.weight  # tie them, as Hugging Face's tie_word_embeddings does
    embedding = model.token_emb.weight.detach().clone()
    inputs = task.parity_inputs(task.heldout_data(checkpoint.config, 4))
    before = torch_logits_fn(model, task.INPUT_NAMES)(inputs)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    smooth = smooth_layers(model, layers, task.calibration_data(checkpoint.config, 4), alpha=0.5)
    assert "lm_head" not in smooth and set(smooth) == set(layers) - {"lm_head"}
    assert torch.equal(model.token_emb.weight, embedding)
    with dividing_inputs(layers, smooth):
        after = torch_logits_fn(model, task.INPUT_NAMES)(inputs)
    assert parity(before, after, 1e-5)["passed"]


def test_smoothquant_artifact_folds_the_division_into_layernorms(shipped, tmp_path):
    """gpt-xs is pre-norm: q/k/v read ln_attn's output, fc_in reads ln_mlp's, and nothing else does, so their 1/s
    goes into the norms' scale and bias; out_proj and fc_out read activations (no norm) and keep a Mul."""
    config = QuantizeConfig(bits=7, block_size=0, activations="static")
    checkpoint, task, data, record, lowering, path = _decoder_artifact(shipped, tmp_path, config,
                                                                       SmoothQuantConfig(alpha=0.5))
    graph = onnx.load(str(path)).graph
    muls = sum(n.op_type == "Mul" and n.name.endswith(".smooth") for n in graph.node)
    # per block: the Mul before q/k/v (one: they share it) and before fc_in fold, out_proj's and fc_out's stay; ln_final
    blocks = checkpoint.config["layers"]
    assert lowering["activations"]["smoothing_folded_into_norms"] == 2 * blocks + 1 and muls == 2 * blocks
    inputs = task.parity_inputs(data)
    session = create_session(path)
    ort_logits = session.run(None, to_ort_feeds(inputs, session))[0]
    torch_logits = torch_logits_fn(checkpoint.model, task.INPUT_NAMES, record["quantized"])(inputs)
    assert parity(torch_logits, ort_logits, 0.15)["passed"]


@pytest.mark.parametrize("bits, block, lookup", [(8, 0, "gathered rows"), (4, 32, "GatherBlockQuantized")])
def test_embedding_tables_are_looked_up_from_their_codes(shipped, tmp_path, bits, block, lookup):
    config = QuantizeConfig(bits=4, block_size=32, embedding_bits=bits, embedding_block_size=block)
    checkpoint, task, data, record, lowering, path = _decoder_artifact(shipped, tmp_path, config)
    tables = [e for e in lowering["lowered"] if e.get("embedding")]
    assert {e["module"] for e in tables} == {"token_emb", "pos_emb"}
    assert {e["lookup"] for e in tables} == {lookup}
    graph = onnx.load(str(path)).graph
    assert not [t for t in graph.initializer if t.name in ("token_emb.weight", "pos_emb.weight")]  # no fp32 copy
    # total model bits count the tables at their codes and scales, beside the Linear weights
    tables_and_weights = sum(m.weight.numel() for m in checkpoint.model.modules()
                             if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    assert record["quantized_params"] == tables_and_weights
    inputs = task.parity_inputs(data)
    session = create_session(path, options=EXACT_MATMULNBITS)
    exact = session.run(None, to_ort_feeds(inputs, session))[0]
    assert parity(torch_logits_fn(checkpoint.model, task.INPUT_NAMES)(inputs), exact, 1e-4)["passed"]


def test_w8a8_run_end_to_end_with_the_kv_cache(compress, tmp_path, optimized_ops):
    out = tmp_path / "o"
    done = compress("run", "gpt-xs", "--recipe", "w8a8", "--out", str(out), "--eval-limit", "8", "--no-bench",
                    "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"] and report["parity"]["by_provider"]["cpu_decode"]["passed"]
    assert report["parity"]["gated"] is False  # no session is exact: the accuracy agreement gates (validate)
    assert all(a["passed"] for a in report["accuracy"]["agreement"].values())
    ops, _ = optimized_ops(out / "model.onnx", tmp_path)
    # 13 Linears, q/k/v packed into one per block (exporters.pack): 9 integer GEMMs, no float MatMul
    assert ops["MatMulIntegerToFloat"] == 13 - 2 * 2 and "MatMul" not in ops, ops
    # the artifact holds those kernels itself (exporters.integer_matmul), q/k/v's packed bias inside theirs
    stored = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert stored.count("MatMulIntegerToFloat") == 9 and "MatMul" not in stored
    assert report["artifact"]["lowering"]["activations"]["integer_matmuls"] == 9
    assert report["artifact"]["lowering"]["activations"]["biases_fused"] >= 2  # at least each block's q/k/v
    assert report["passes"][0]["embeddings"]


def test_w8a8_after_structured_pruning_and_low_rank(compress_here, tmp_path, optimized_ops):
    """The chain prune -> low-rank -> W8A8: the shrunk and factorized Linears (two per low-rank layer) all run
    as integer GEMMs, and the artifact still matches its fake-quantized torch model."""
    out = tmp_path / "o"
    done = compress_here("run", "gpt-xs", "--recipe", "w8a8", "--set", "structured_prune.heads=0.25",
                         "--set", "structured_prune.ffn=0.25", "--set", "lowrank.rank_ratio=0.5", "--out", str(out),
                         "--eval-limit", "8", "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["structured_prune", "lowrank", "quantize"]
    assert report["parity"]["by_provider"]["cpu_decode"]["passed"]
    activations = report["artifact"]["lowering"]["activations"]
    assert activations["matmuls"] > 13  # low-rank made two Linears of most of gpt-xs's 13
    ops, _ = optimized_ops(out / "model.onnx", tmp_path)
    assert ops["MatMulIntegerToFloat"] == activations["integer_matmuls"] and "MatMul" not in ops, ops

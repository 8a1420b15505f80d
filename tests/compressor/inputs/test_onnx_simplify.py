"""onnxsim on an fp32 ONNX input before quantization (compressor.inputs.onnx.simplify_graph): it folds a
third-party export's shape arithmetic, leaves every weight where the QDQ lowering places it, matches the input graph
under ONNX Runtime, and keeps the input graph, saying why, whenever one of those fails."""
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import compressor.inputs.onnx as adapter
from compressor.inputs.checkpoint import load_checkpoint
from compressor.inputs.onnx import load_onnx_input, matmul_weights, simplify_graph
from compressor.ort_runtime import create_session
from compressor.tasks import TASKS

FAST = ("--eval-limit", "16", "--no-bench", "--quiet")  # nothing here reads latency


def _torchscript_export(shipped, folder: Path, opset: int) -> Path:
    checkpoint = load_checkpoint(shipped / "gpt-xs")
    ids = torch.from_numpy(TASKS["gpt"].benchmark_inputs(checkpoint.config, 1)["input_ids"]).long()
    path = folder / f"gpt-xs-opset{opset}.onnx"
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(checkpoint.model.eval(), (ids,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "logits": axes})
    model = onnx.load(str(path))
    helper.set_model_props(model, {"compressor.family": "gpt",
                                   "compressor.model_config": json.dumps(checkpoint.config)})
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def torchscript_onnx(shipped, tmp_path_factory) -> Path:
    """gpt-xs as a third party exports it: torch's TorchScript exporter (dynamo=False) with dynamic batch and
    sequence axes, which leaves Constant nodes and Shape -> Gather -> Unsqueeze -> Concat chains; plus the task
    metadata an ONNX input must carry. Opset 21: the QDQ lowering's blocked DequantizeLinear needs it."""
    return _torchscript_export(shipped, tmp_path_factory.mktemp("torchscript"), 21)


def test_an_older_opset_is_converted_and_checked(shipped, tmp_path, compress_here, monkeypatch):
    """Opset 17 has no blocked DequantizeLinear: the input is converted to opset 21 (ONNX's version converter),
    checked against the input graph, and said so; a graph the converter cannot take is one line, exit 2."""
    path = _torchscript_export(shipped, tmp_path, 17)
    done = compress_here("run", str(path), "--out", str(tmp_path / "out"), "--recipe", "int4", "--eval-limit", "4",
                         "--no-bench")
    assert done.returncode == 0, done.stderr
    assert "opset 17 -> 21 (ONNX's version converter)" in done.stderr  # the run's log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["opset_converted"] == {"from": 17, "to": 21} and report["artifact"]["opset"] == 21
    monkeypatch.setattr(adapter.version_converter, "convert_version", _raise)
    done = compress_here("run", str(path), "--out", str(tmp_path / "refused"), "--recipe", "int4", "--quiet")
    assert done.returncode == 2 and "re-export the model at opset 21" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()


def _simplify(path: Path):
    """(input proto, simplified proto, record, reference session, check inputs) as onnx_source makes them."""
    proto = load_onnx_input(path)
    config = json.loads({p.key: p.value for p in proto.metadata_props}["compressor.model_config"])
    reference = create_session(path)
    inputs = TASKS["gpt"].benchmark_inputs(config, 1)
    result, record = simplify_graph(proto, reference, inputs)
    return proto, result, record, reference, inputs


def _outputs(model: onnx.ModelProto, ids: np.ndarray, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


def test_simplification_folds_a_torchscript_export_and_matches_it(torchscript_onnx):
    proto, result, record, _, _ = _simplify(torchscript_onnx)
    assert record["applied"], record
    assert record["nodes_before"] == len(proto.graph.node) and record["nodes_after"] == len(result.graph.node)
    # measured 191 -> 123 (torch 2.13, onnxsim 0.8.1): Constant -56, Shape -8, Cast -3, Unsqueeze -1
    assert record["nodes_after"] <= 0.75 * record["nodes_before"]
    assert record["op_changes"]["Constant"] < 0 and record["op_changes"]["Shape"] < 0
    # every float initializer (weights, biases, norms, tables) is the input's, by name and bytes; onnxsim's folds
    # add only integer constants (shapes, axes)
    before = {t.name: t.SerializeToString() for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT}
    after = {t.name: t.SerializeToString() for t in result.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert after == before
    assert list(matmul_weights(result)) == list(matmul_weights(proto))
    assert [i.name for i in result.graph.input] == ["input_ids"] and result.metadata_props == proto.metadata_props
    rng = np.random.default_rng(0)
    for shape in ((2, 100), (1, 7)):  # other shapes than the check's one batch of `context` tokens
        ids = rng.integers(0, 256, shape).astype(np.int64)
        # onnxsim's rewrite is exact op for op: equal with ONNX Runtime's graph optimizations off
        np.testing.assert_array_equal(_outputs(result, ids, False), _outputs(proto, ids, False))
        # with them on, ONNX Runtime fuses more of the simplified graph and sums in another order: SIMPLIFY_RTOL
        # (1e-5) of the largest logit, a few fp32 roundings; measured 0 here, 4.2e-7 on the opset-17 export
        expected, got = _outputs(proto, ids, True), _outputs(result, ids, True)
        assert np.abs(got - expected).max() <= adapter.SIMPLIFY_RTOL * np.abs(expected).max()


def test_simplification_is_deterministic(torchscript_onnx):
    _, first, _, _, _ = _simplify(torchscript_onnx)
    _, second, _, _, _ = _simplify(torchscript_onnx)
    assert first.SerializeToString() == second.SerializeToString()


def _tied_graph() -> onnx.ModelProto:
    """logits = Reshape(Gather(Identity(table), ids), [batch, -1, D] from Shape and Constant nodes) @
    Transpose(table): an LM head sharing the embedding table, which the QDQ lowering finds through the Transpose.
    The Identity is the TorchScript exporter's way of reading a tensor a second time."""
    table = numpy_helper.from_array(np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32), "table")
    nodes = [
        helper.make_node("Identity", ["table"], ["table_again"]),
        helper.make_node("Gather", ["table_again", "input_ids"], ["embedded"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Gather", ["ids_shape", "zero"], ["batch"]),
        helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1, 4], np.int64))),
        helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array([1, 2], np.int64))),
        helper.make_node("Mul", ["rest", "scale"], ["rest_width"]),  # [-1, 8]: folds to a constant
        helper.make_node("Concat", ["batch", "rest_width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["embedded", "shape"], ["hidden"]),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["hidden", "table_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 32])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_a_tied_table_stays_one_initializer_read_through_its_transpose():
    model = _tied_graph()
    onnx.checker.check_model(model)
    reference = create_session(model.SerializeToString())
    inputs = {"input_ids": np.arange(12, dtype=np.int64).reshape(2, 6) % 32}
    result, record = simplify_graph(model, reference, inputs)
    assert record["applied"] and record["op_changes"]["Identity"] == -1, record  # the Gather reads the table
    assert [t.name for t in result.graph.initializer if t.data_type == TensorProto.FLOAT] == ["table"]
    transpose = [n for n in result.graph.node if n.op_type == "Transpose"]
    assert len(transpose) == 1 and transpose[0].input[0] == "table"
    # onnxsim left to itself folds the Transpose into a second, transposed copy of the table, which the lowering
    # would quantize as a MatMul weight of its own while the Gather keeps the float table
    plain, _ = onnxsim.simplify(model, certify=False)
    assert "Transpose" not in [n.op_type for n in plain.graph.node]
    assert len([t for t in plain.graph.initializer if t.data_type == TensorProto.FLOAT]) == 2


def _with_a_weight_read_by_another_op(simplified: onnx.ModelProto) -> onnx.ModelProto:
    """The first MatMul's weight read by a Cast instead (as a fusion into another op, e.g. Gemm, would have it)."""
    matmul = next(n for n in simplified.graph.node if n.op_type == "MatMul")
    weight = matmul.input[1]
    matmul.input[1] = "rerouted"
    simplified.graph.node.insert(0, helper.make_node("Cast", [weight], ["rerouted"], to=TensorProto.FLOAT))
    return simplified


def _with_scaled_output(simplified: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's output scaled by 1.001: a simplification that changed the numbers."""
    producer = next(n for n in simplified.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "unscaled"
    simplified.graph.node.extend([
        helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(1.001, np.float32))),
        helper.make_node("Mul", ["unscaled", "scale"], ["logits"])])
    return simplified


def _raise(*args, **kwargs):
    raise RuntimeError("[ShapeInferenceError] something onnxsim could not do\nsecond line")


@pytest.mark.parametrize("case, needle", [
    ("off", "off (compressor.inputs.onnx.SIMPLIFY)"),
    ("large", "MiB, over the"),
    ("fails", "onnxsim failed: [ShapeInferenceError] something onnxsim could not do"),
    ("rereads", "onnxsim changed how weights are read"),
    ("differs", "differs from the input graph's by"),
])
def test_the_input_graph_is_kept_with_a_reason(torchscript_onnx, monkeypatch, case, needle):
    real = onnxsim.simplify
    if case == "off":
        monkeypatch.setattr(adapter, "SIMPLIFY", False)
    elif case == "large":
        monkeypatch.setattr(adapter, "SIMPLIFY_MAX_BYTES", 100_000)  # the graph is 0.5 MB
    elif case == "fails":
        monkeypatch.setattr(onnxsim, "simplify", _raise)
    else:
        rewrite = _with_a_weight_read_by_another_op if case == "rereads" else _with_scaled_output
        monkeypatch.setattr(onnxsim, "simplify", lambda model, **kwargs: (rewrite(real(model, **kwargs)[0]), True))
    proto, result, record, _, _ = _simplify(torchscript_onnx)
    assert result is proto and not record["applied"], record
    assert record["nodes_after"] == record["nodes_before"] == len(proto.graph.node)
    assert needle in record["reason"] and "\n" not in record["reason"], record["reason"]


def test_a_graph_with_nothing_to_fold_is_kept():
    model = _tied_graph()
    plain, _ = onnxsim.simplify(model, certify=False)  # the Transpose folded: nothing left for a second run
    reference = create_session(plain.SerializeToString())
    result, record = simplify_graph(plain, reference, {"input_ids": np.zeros((1, 3), np.int64)})
    assert result is plain and record["reason"].startswith("onnxsim removed no node"), record


def test_run_on_a_torchscript_export_simplifies_and_lowers_every_weight_by_name(compress, compress_here,
                                                                              torchscript_onnx, tmp_path,
                                                                              monkeypatch):
    done = compress("run", str(torchscript_onnx), "--out", str(tmp_path / "a"), "--recipe", "int4", *FAST)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    simplified = report["model"]["simplified"]
    assert simplified["applied"] and simplified["nodes_after"] < simplified["nodes_before"], simplified
    line = f"onnxsim: {simplified['nodes_before']} -> {simplified['nodes_after']} nodes ("
    log = done.stderr.splitlines()  # the run's log
    assert [text for text in log if text.startswith("onnxsim:")] == [text for text in log if text.startswith(line)] != []
    lowered = report["artifact"]["lowering"]["lowered"]
    proto = onnx.load(str(torchscript_onnx))
    assert sorted(entry["initializer"] for entry in lowered) == sorted(matmul_weights(proto))
    assert {entry["found_by"] for entry in lowered} == {"name"}
    # same input, same artifact: a second run (in this process) writes the same bytes
    again = compress_here("run", str(torchscript_onnx), "--out", str(tmp_path / "b"), "--recipe", "int4", *FAST)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()
    # without simplification: the same quantized weights and the same held-out figures, in a larger graph
    monkeypatch.setattr(adapter, "SIMPLIFY", False)
    assert compress_here("run", str(torchscript_onnx), "--out", str(tmp_path / "c"), "--recipe", "int4",
                         *FAST).returncode == 0
    given = json.loads((tmp_path / "c" / "report.json").read_text())
    assert not given["model"]["simplified"]["applied"]
    assert given["passes"][0]["perplexity"] == pytest.approx(report["passes"][0]["perplexity"], rel=1e-6)
    assert given["accuracy"]["onnxruntime"]["cpu"] == pytest.approx(report["accuracy"]["onnxruntime"]["cpu"],
                                                                    rel=1e-6)
    assert given["total_model_bits"] == report["total_model_bits"]
    assert [e["initializer"] for e in given["artifact"]["lowering"]["lowered"]] == [e["initializer"] for e in lowered]
    nodes = {d: len(onnx.load(str(tmp_path / d / "model.onnx")).graph.node) for d in "ac"}
    assert nodes["a"] < nodes["c"]

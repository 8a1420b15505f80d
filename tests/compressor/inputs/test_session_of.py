"""compressor.inputs.onnx.session_of: a graph held in memory runs from its bytes, or past the external-data
threshold (protobuf serializes nothing over 2 GiB) from a temporary model.onnx + model.onnx.data, with the same
outputs and the proto left whole."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import compressor.inputs.onnx as onnx_input
import compressor.onnx_file as onnx_file


def _matmul_model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 1000, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_a_graph_past_the_threshold_runs_from_external_data(monkeypatch):
    model = _matmul_model()
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    expected = onnx_input.session_of(model).run(None, {"x": x})[0]
    monkeypatch.setattr(onnx_input, "EXTERNAL_DATA_ABOVE", 100)
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_ABOVE", 100)
    saved = []
    real_save = onnx_input.save_onnx
    monkeypatch.setattr(onnx_input, "save_onnx", lambda proto, path: (saved.append(path), real_save(proto, path)))
    got = onnx_input.session_of(model).run(None, {"x": x})[0]
    assert saved and not saved[0].exists()  # written, run, then removed
    np.testing.assert_array_equal(got, expected)
    assert model.graph.initializer[0].HasField("raw_data")  # the caller's proto keeps its tensors

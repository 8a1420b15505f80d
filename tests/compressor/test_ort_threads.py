"""COMPRESSOR_ORT_THREADS: the intra-op threads of every ONNX Runtime session `compress` creates (processes that
share a machine's cores, e.g. the test workers, take their share instead of one thread per core each)."""
import onnx
import pytest
from onnx import TensorProto, helper

from compressor.errors import UserError
from compressor.ort_runtime import THREADS_VARIABLE, create_session


def _identity_model() -> bytes:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_sessions_take_their_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert create_session(_identity_model()).get_session_options().intra_op_num_threads == 3
    assert create_session(_identity_model(), threads=1).get_session_options().intra_op_num_threads == 1
    monkeypatch.delenv(THREADS_VARIABLE)
    assert create_session(_identity_model()).get_session_options().intra_op_num_threads == 0  # ORT's default


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "²", "100000"])
def test_a_bad_thread_count_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv(THREADS_VARIABLE, value)
    with pytest.raises(UserError, match=THREADS_VARIABLE):
        create_session(_identity_model())

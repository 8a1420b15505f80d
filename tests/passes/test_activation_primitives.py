"""Activation quantization math against ONNX's own operators (exact) and plain references."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from passes import activation_primitives as ap


def _run_qdq(nodes, inits, x: np.ndarray) -> np.ndarray:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _values() -> np.ndarray:
    x = (np.random.default_rng(0).standard_normal((48, 256)) * 3).astype(np.float32)
    x[0, :8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 7.5, -7.5, 100], np.float32) * np.float32(0.02)  # ties
    return x


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_static_fake_quantization_is_quantize_linear_exactly(dtype):
    x = _values()
    scale, zero = ap.static_qparams(float(x.min()), float(x.max()), dtype)
    if dtype == "int8":
        scale = 0.02  # lands the planted values on rounding ties
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero, np.uint8 if dtype == "uint8" else np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    expected = _run_qdq(nodes, inits, x)
    np.testing.assert_array_equal(ap.fake_quantize(torch.from_numpy(x), scale, zero, dtype).numpy(), expected)


@pytest.mark.parametrize("sign", [1, -1, 0])
def test_dynamic_fake_quantization_is_dynamic_quantize_linear_exactly(sign):
    x = _values() if sign == 0 else sign * np.abs(_values())  # mixed, all positive, all negative
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    np.testing.assert_array_equal(ap.fake_quantize_dynamic(torch.from_numpy(x)).numpy(), _run_qdq(nodes, [], x))


def test_static_qparams_keep_zero_exact_and_int8_symmetric():
    scale, zero = ap.static_qparams(-0.3, 5.0, "uint8")
    assert 0 < zero < 255 and ap.fake_quantize(torch.zeros(3), scale, zero, "uint8").eq(0).all()
    scale, zero = ap.static_qparams(0.5, 2.0, "uint8")  # the range is widened to include 0
    assert zero == 0 and scale == pytest.approx(2.0 / 255)
    scale, zero = ap.static_qparams(-4.0, 1.0, "int8")
    assert zero == 0 and scale == pytest.approx(4.0 / 127)
    assert ap.static_qparams(0.0, 0.0, "uint8") == (1.0, 0)  # an all-zero input


def test_observers_clip_outliers_that_minmax_keeps():
    torch.manual_seed(0)
    values = torch.randn(100_000)
    values[:10] = 80.0  # a few huge outliers
    low, high = float(values.min()), float(values.max())
    assert ap.observed_range(values, low, high, "minmax", 99.99, "uint8") == (low, high)
    p_low, p_high = ap.observed_range(values, low, high, "percentile", 99.9, "uint8")
    assert 2.5 < p_high < 4.5 and -4.5 < p_low < -2.5  # N(0, 1)'s 99.9th percentile is 3.09
    kept = ap.observed_range(values, low, high, "entropy", 99.99, "uint8")
    assert kept[1] < high / 2, kept
    scale, zero = ap.static_qparams(*kept, "uint8")
    clipped_error = float(((ap.fake_quantize(values, scale, zero, "uint8") - values)[10:] ** 2).mean())
    scale, zero = ap.static_qparams(low, high, "uint8")
    minmax_error = float(((ap.fake_quantize(values, scale, zero, "uint8") - values)[10:] ** 2).mean())
    assert clipped_error < minmax_error / 10  # the bulk of the values is what clipping buys back


def _error(values: torch.Tensor, kept: tuple[float, float]) -> float:
    scale, zero = ap.static_qparams(*kept, "uint8")
    return float(((ap.fake_quantize(values, scale, zero, "uint8") - values) ** 2).mean())


def test_mse_observer_minimizes_the_error_it_is_named_after():
    torch.manual_seed(0)
    # heavy tails, where clipping pays; as many values as the search scores, so that it sees them all
    values = torch.distributions.Laplace(0.0, 1.0).sample((ap.MSE_SEARCH_LIMIT,))
    low, high = float(values.min()), float(values.max())
    kept = ap.observed_range(values, low, high, "mse", 99.99, "uint8")
    assert kept[1] < high and _error(values, kept) < _error(values, (low, high))
    for factor in (0.3, 0.5, 0.9):  # no other shrink of the range does better
        assert _error(values, kept) <= _error(values, (low * factor, high * factor))


def test_sample_values_is_deterministic_and_bounded():
    x = torch.arange(1000.0).reshape(10, 100)
    sample = ap.sample_values(x, 64)
    assert sample.numel() <= 64 and torch.equal(sample, ap.sample_values(x, 64))


def test_smoothing_scales_follow_the_formula():
    x_max, w_max = torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 4.0, 0.25])
    s = ap.smoothing_scales(x_max, w_max, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 6.0]))
    torch.testing.assert_close(ap.smoothing_scales(x_max, w_max, 1.0), x_max)  # all moved into the weights

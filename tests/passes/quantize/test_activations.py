"""IntegerActivations (W8A8): its checks, the stored integer weights, calibration, and the ONNX form of one
quantized input under ONNX Runtime against the torch fake quantization the report's torch column uses."""
import numpy as np
import pytest
import torch
from torch import nn

from passes import activation_primitives as ap
from passes import quant_primitives as qp
from passes.quantize.activations import ActivationQuant, IntegerActivations, activation_nodes, calibrate_static

from scheme_graphs import run_graph


@pytest.mark.parametrize("fields, message", [
    ({"activations": "none"}, "needs activations static or dynamic"),
    ({"activations": "always"}, "activations must be one of"),
    ({"activation_observer": "max"}, "activation_observer must be one of"),
    ({"activation_percentile": 0}, r"activation_percentile must be in \(0, 100\]"),
    ({"integer_weights": "int4"}, "integer_weights must be uint8 or int8"),
])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        IntegerActivations(**fields)


def test_uint8_storage_keeps_the_values():
    weight = torch.randn(16, 64) * 0.1
    q = qp.quantize_int_symmetric(weight, 8, qp.PER_CHANNEL)
    stored = IntegerActivations(integer_weights="uint8").stored_weights(q)
    assert int(stored.codes.min()) >= 0 and int(stored.codes.max()) <= 255
    assert torch.equal(qp.dequantize(stored), qp.dequantize(q))
    assert IntegerActivations().stored_weights(q) is q  # int8 storage: as quantized


@pytest.mark.parametrize("quant", [
    ActivationQuant("static", "uint8", 0.02, 128),
    ActivationQuant("static", "int8", 0.03, 0),
    ActivationQuant("dynamic"),
    ActivationQuant("static", "uint8", 0.02, 128, smooth=torch.linspace(0.5, 2.0, 32)),
], ids=["static-uint8", "static-int8", "dynamic", "static-smoothed"])
def test_the_onnx_form_is_the_torch_fake_quantization(quant):
    """Exact: QuantizeLinear rounds half to even as torch.round does, and the scale is the same fp32 value."""
    x = torch.randn(4, 32) * 1.5
    nodes, inits, out = activation_nodes("x.act", "x", quant)
    got = run_graph(nodes, inits, {"x": x.numpy()}, out)
    smoothed = x if quant.smooth is None else x * (1.0 / quant.smooth.double()).float()
    expected = ap.fake_quantize(smoothed, quant.scale, quant.zero_point, quant.dtype) if quant.mode == "static" \
        else ap.fake_quantize_dynamic(smoothed)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)


def test_minmax_calibration_covers_what_the_layer_saw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [(torch.randn(16, 8),) for _ in range(3)]
    found = calibrate_static(model, {"2": model[2]}, batches, {}, "minmax", 99.99, "uint8")["2"]
    with torch.no_grad():
        seen = torch.cat([torch.relu(model[0](b[0])) for b in batches])
    assert found.observed == pytest.approx((float(seen.min()), float(seen.max())))
    low, high = found.range
    assert low <= float(seen.min()) and high >= float(seen.max())

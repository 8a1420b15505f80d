"""IntWeights: its checks, its quantizer against the rounding it promises, its lowering under ONNX Runtime."""
import numpy as np
import pytest
import torch

from passes import quant_primitives as qp
from passes.quantize.int_weights import IntWeights

from scheme_graphs import EXACT, expanded_scales, lowered_matmul, relative_error


@pytest.mark.parametrize("fields, message", [
    ({"bits": 9}, "bits must be an integer in 2..8"),
    ({"block_size": 48}, "block_size must be a power of two"),
    ({"zero_point": "float"}, "zero_point=float needs"),
    ({"symmetric": False, "zero_point": "float", "method": "gptq"}, "works with method=rtn only"),
    ({"method": "gptq", "block_size": -1}, "gptq needs per-channel"),
    ({"gptq_damp": float("nan")}, "gptq_damp must be a positive number"),
    ({"scale_search": "grid"}, "scale_search must be one of none, mse, activation"),
    ({"symmetric": False, "zero_point": "float", "scale_search": "mse"}, "scale_search works with method=rtn"),
    ({"method": "gptq", "scale_search": "activation"}, "not zero_point=float or GPTQ"),
])
def test_bad_fields_are_refused_with_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        IntWeights(**fields)


@pytest.mark.parametrize("scheme", [
    IntWeights(bits=4, block_size=32),
    IntWeights(bits=4, block_size=32, full_range=True),
    IntWeights(bits=3, block_size=0, symmetric=False),
    IntWeights(bits=4, block_size=32, symmetric=False, zero_point="float"),
    IntWeights(bits=8, block_size=-1),
], ids=lambda s: "-".join(s.label_parts()))
def test_round_to_nearest_is_within_half_a_step(weight_and_input, scheme):
    """Every weight lands within half its group's step of its value (the plain reference of rounding to the
    nearest level), on a level the bits can hold. Full range puts the block's extreme on level -2^(k-1): values of
    the other sign past 2^(k-1) - 1 steps clip, by at most one step."""
    weight = torch.from_numpy(weight_and_input[0])
    q = scheme.quantize(weight)
    low, high = (0, 2 ** scheme.bits - 1) if q.zero_points is not None else \
        (-(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1)
    assert int(q.codes.min()) >= low and int(q.codes.max()) <= high
    step = expanded_scales(q, weight.shape).abs()  # full range: a negative scale puts the extreme on -2^(k-1)
    reach = step if scheme.full_range else step / 2
    assert bool(((weight - qp.dequantize(q)).abs() <= reach + 1e-6).all())


@pytest.mark.parametrize("scheme", [
    IntWeights(bits=4, block_size=32, full_range=True),
    IntWeights(bits=3, block_size=0, symmetric=False),
    IntWeights(bits=4, block_size=32, symmetric=False, zero_point="float"),
    IntWeights(bits=4, block_size=64, scale_dtype="float16"),
    IntWeights(bits=8, block_size=-1),
    IntWeights(bits=4, block_size=32, full_range=True, scale_search="mse"),
    IntWeights(bits=4, block_size=32, symmetric=False, scale_search="mse"),
    IntWeights(bits=4, block_size=64, symmetric=False, scale_search="mse", scale_dtype="float16"),
], ids=lambda s: f"{'-'.join(s.label_parts())}-{s.scale_dtype}")
def test_lowering_computes_the_dequantized_weight(weight_and_input, scheme):
    weight, x = weight_and_input
    q = scheme.quantize(torch.from_numpy(weight))
    expected = x.astype(np.float64) @ qp.dequantize(q).double().numpy().T
    assert relative_error(expected, lowered_matmul(scheme, q, x)) < EXACT


def test_gptq_uses_the_hessian_and_beats_rounding_on_its_layer_error():
    """GPTQ (the solver IntWeights(method=gptq) uses) lowers the layer's output error on the calibration inputs
    below round-to-nearest's at the same bits and blocks."""
    torch.manual_seed(0)
    weight, x = torch.randn(32, 128) * 0.05, torch.randn(512, 128) @ torch.randn(128, 128) * 0.3
    hessian = x.T @ x
    errors = {}
    for method in ("rtn", "gptq"):
        q = IntWeights(bits=3, block_size=32, method=method).quantize(weight, hessian)
        errors[method] = float(((x @ (weight - qp.dequantize(q)).T) ** 2).sum())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def _block_errors(weight: torch.Tensor, q, importance: torch.Tensor, block_size: int) -> list[float]:
    """The plain reference: each block's sum of importance * (w - dequantized w)^2, block by block."""
    approx = qp.dequantize(q)
    errors = []
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], block_size):
            end = start + block_size
            errors.append(float((importance[start:end] * (weight[row, start:end] - approx[row, start:end]) ** 2).sum()))
    return errors


@pytest.mark.parametrize("fields", [
    {"bits": 4, "block_size": 32, "full_range": True},
    {"bits": 4, "block_size": 32},
    {"bits": 4, "block_size": 32, "symmetric": False},
    {"bits": 3, "block_size": 64, "symmetric": False},
    {"bits": 4, "block_size": 32, "full_range": True, "scale_dtype": "float16"},
], ids=lambda f: "-".join(IntWeights(**f).label_parts()) + f"-{f.get('scale_dtype', 'float32')}")
@pytest.mark.parametrize("search", ["mse", "activation"])
def test_searched_scales_lose_to_absmax_on_no_block(weight_and_input, fields, search):
    """scale_search: every block's (activation-weighted) squared error is at most round-to-nearest's with the
    absmax / min-max scale, and the layer's total is lower; "activation" weighs each input column by its mean x^2
    (the Hessian's diagonal), which makes it need calibration statistics."""
    weight, x = (torch.from_numpy(a) for a in weight_and_input)
    x = x.repeat(8, 1) * torch.linspace(0.1, 3, x.shape[1])  # input channels of unequal size
    hessian = x.T @ x
    searched_scheme = IntWeights(**fields, scale_search=search)
    assert searched_scheme.needs_statistics == (search == "activation")
    assert searched_scheme.label_parts()[-1] == {"mse": "mse", "activation": "amse"}[search]
    importance = torch.diagonal(hessian) if search == "activation" else torch.ones(weight.shape[1])
    plain = _block_errors(weight, IntWeights(**fields).quantize(weight), importance, fields["block_size"])
    searched = _block_errors(weight, searched_scheme.quantize(weight, hessian), importance, fields["block_size"])
    assert all(s <= p * (1 + 1e-6) for s, p in zip(searched, plain))
    assert sum(searched) < 0.95 * sum(plain), (sum(searched), sum(plain))


def test_the_activation_search_reads_only_the_hessian_diagonal():
    """scale_search=activation weighs input channels by H's diagonal: the quantize pass hands it that alone
    (calibration.input_second_moments(diagonal=True), no K x K matrix per layer), with the same result."""
    from torch import nn

    from passes.calibration import input_second_moments
    from passes.quantize import QuantizeConfig, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    calibration = [(torch.randn(16, 64) * torch.linspace(0.2, 3, 64),) for _ in range(2)]
    full = input_second_moments(model, [model[0]], calibration)[0]
    diagonal = input_second_moments(model, [model[0]], calibration, diagonal=True)[0]
    torch.testing.assert_close(diagonal, torch.diagonal(full))
    scheme = IntWeights(bits=4, block_size=16, scale_search="activation")
    assert scheme.diagonal_statistics and not IntWeights(method="gptq").diagonal_statistics
    weight = model[0].weight.detach()
    by_full, by_diagonal = scheme.quantize(weight, full), scheme.quantize(weight, diagonal)
    assert torch.equal(by_full.codes, by_diagonal.codes) and torch.equal(by_full.scales, by_diagonal.scales)
    record = quantize_model(model, QuantizeConfig(bits=4, block_size=16, scale_search="activation",
                                                  sequential="none"), calibration)
    assert record["label"] == "int4-B16-amse" and torch.equal(record["quantized"]["0"].quantized.codes.long(),
                                                             by_diagonal.codes)

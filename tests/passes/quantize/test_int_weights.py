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

"""Property-based tests of passes/quant_primitives.py: random shapes, block sizes, bit widths and values
(all-zero and constant rows, tiny and large magnitudes, mixed signs; finite float32 only), checked against
plain float64 / numpy references: code ranges, scale and zero-point shapes, finite dequantization,
round-to-nearest optimality and nearest-codebook-entry assignment."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from passes import quant_primitives as qp

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
BLOCKS = [16, 32, qp.PER_CHANNEL, qp.PER_TENSOR]
ROW_KINDS = ["zero", "constant", "tiny", "normal", "large", "mixed", "positive", "negative"]
# subnormals are left to the xfail tests below (a known bug); everything else in +-1e4 is fair game
F32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                width=32)


@st.composite
def shapes(draw, partial: bool, blocks=BLOCKS):
    """(rows, cols, block_size): cols a multiple of the block size, or, where `partial`, any count of columns."""
    block = draw(st.sampled_from(blocks))
    rows = draw(st.integers(1, 9))
    if block > 0:
        cols = block * draw(st.integers(1, 3))
        if partial and draw(st.booleans()):
            cols = block * draw(st.integers(0, 2)) + draw(st.integers(1, block - 1))
    else:
        cols = draw(st.integers(1, 70))
    return rows, cols, block


def _row(kind: str, cols: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "zero":
        return np.zeros(cols)
    if kind == "constant":
        return np.full(cols, rng.choice([-3.5, 1e-30, 0.25, 1e4]))
    if kind == "tiny":
        return rng.standard_normal(cols) * 1e-30
    if kind == "large":
        return rng.standard_normal(cols) * 1e4
    if kind == "mixed":  # magnitudes over 34 decades, both signs, some exact zeros
        values = rng.choice([-1.0, 1.0], cols) * 10.0 ** rng.uniform(-30, 4, cols)
        return np.where(rng.random(cols) < 0.1, 0.0, values)
    if kind == "positive":
        return np.abs(rng.standard_normal(cols)) + 0.5
    if kind == "negative":
        return -np.abs(rng.standard_normal(cols)) - 0.5
    return rng.standard_normal(cols)


@st.composite
def weights(draw, partial: bool, blocks=BLOCKS):
    """(weight [N, K] float32, block_size): each row of one kind, plus a few hypothesis-chosen float32 values."""
    rows, cols, block = draw(shapes(partial, blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=rows, max_size=rows))
    array = np.stack([_row(kind, cols, rng) for kind in kinds]).astype(np.float32)
    for _ in range(draw(st.integers(0, 3))):
        array[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = draw(F32)
    assert np.isfinite(array).all()
    return torch.from_numpy(array), block


def _groups64(weight: torch.Tensor, block: int) -> list[tuple[np.ndarray, list]]:
    """Plain reference grouping: per group, its float64 values and their (row, col) positions; no padding."""
    rows, cols = weight.shape
    w = weight.double().numpy()
    if block == qp.PER_TENSOR:
        return [(w.reshape(-1), [(r, c) for r in range(rows) for c in range(cols)])]
    size = cols if block == qp.PER_CHANNEL else block
    out = []
    for r in range(rows):
        for start in range(0, cols, size):
            idx = [(r, c) for c in range(start, min(start + size, cols))]
            out.append((w[r, start : start + size], idx))
    return out


def _expected_scale_shape(rows, cols, block):
    if block == qp.PER_TENSOR:
        return (1, 1)
    if block == qp.PER_CHANNEL:
        return (rows, 1)
    return (rows, math.ceil(cols / block))


def _per_group(tensor: torch.Tensor, rows: int, cols: int, block: int) -> np.ndarray:
    """A [N, groups] tensor as a flat float64 array in the order of _groups64."""
    return tensor.double().reshape(-1).numpy()


def _assert_nearest_level(weight, deq, grid_of_group, block):
    """Each dequantized value is (up to float32 rounding) the representable level nearest to its weight:
    grid_of_group(g) -> (levels offset m, step S, lowest code, highest code) for w = m + S * code."""
    deq = deq.double().numpy()
    for g, (values, idx) in enumerate(_groups64(weight, block)):
        offset, step, low, high = grid_of_group(g)
        best = np.clip(np.round((values - offset) / step), low, high) * step + offset
        got = np.array([deq[r, c] for r, c in idx])
        # float32 division / rounding in the library: a tie can break either way, a product is one ulp off
        eps = 4 * np.finfo(np.float32).eps * (np.abs(values) + abs(step) * max(abs(low), abs(high)) + abs(offset))
        assert np.all(np.abs(values - got) <= np.abs(values - best) + eps + 1e-44), (g, values, got, best)


# ---- int symmetric -----------------------------------------------------------------------------------------

@SETTINGS
@given(data=weights(partial=True), bits=st.integers(2, 8), full_range=st.booleans())
def test_int_symmetric_properties(data, bits, full_range):
    _check_int_symmetric(*data, bits, full_range)


def _check_int_symmetric(weight, block, bits, full_range):
    rows, cols = weight.shape
    q = qp.quantize_int_symmetric(weight, bits, block, full_range=full_range)
    qmax = 2 ** (bits - 1) - 1
    low = -qmax - 1 if full_range else -qmax
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.int64
    assert int(q.codes.min()) >= low and int(q.codes.max()) <= qmax
    assert tuple(q.scales.shape) == _expected_scale_shape(rows, cols, block)
    assert q.zero_points is None and q.codebook is None and q.offsets is None
    scales = _per_group(q.scales, rows, cols, block)
    assert np.isfinite(scales).all() and np.all(scales != 0)
    # the scales against a plain numpy float32 reference
    for g, (values, _) in enumerate(_groups64(weight, block)):
        v32 = values.astype(np.float32)
        if full_range:
            extreme = v32[np.argmax(np.abs(v32))]
            expected = extreme / np.float32(-(qmax + 1)) if extreme != 0 else np.float32(1)
        else:
            absmax = np.abs(v32).max()
            expected = absmax / np.float32(qmax) if absmax > 0 else np.float32(1)
        assert scales[g] == expected, (g, scales[g], expected)
    deq = qp.dequantize(q)
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    _assert_nearest_level(weight, deq, lambda g: (0.0, scales[g], low, qmax), block)
    if not full_range:  # no clipping: every value within half a step of its level
        for g, (values, idx) in enumerate(_groups64(weight, block)):
            got = np.array([deq.double()[r, c].item() for r, c in idx])
            bound = scales[g] / 2 * (1 + 4 * np.finfo(np.float32).eps) + 1e-44
            assert np.all(np.abs(values - got) <= bound)
    assert torch.all(deq[weight == 0] == 0)  # zeros, zero rows included, come back exactly
    assert torch.all(deq[(weight == 0).all(dim=1)] == 0)


# ---- int asymmetric (integer zero point) ---------------------------------------------------------------------

@SETTINGS
@given(data=weights(partial=True), bits=st.integers(2, 8))
def test_int_asymmetric_properties(data, bits):
    _check_int_asymmetric(*data, bits)


def _check_int_asymmetric(weight, block, bits):
    rows, cols = weight.shape
    q = qp.quantize_int_asymmetric(weight, bits, block)
    qmax = 2**bits - 1
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.int64
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= qmax
    shape = _expected_scale_shape(rows, cols, block)
    assert tuple(q.scales.shape) == shape and tuple(q.zero_points.shape) == shape
    assert q.zero_points.dtype == torch.int64
    assert int(q.zero_points.min()) >= 0 and int(q.zero_points.max()) <= qmax
    scales, zeros = _per_group(q.scales, rows, cols, block), _per_group(q.zero_points, rows, cols, block)
    assert np.isfinite(scales).all() and np.all(scales > 0)
    for g, (values, _) in enumerate(_groups64(weight, block)):
        v32 = values.astype(np.float32)
        span = max(v32.max(), np.float32(0)) - min(v32.min(), np.float32(0))
        assert scales[g] == (span / np.float32(qmax) if span > 0 else np.float32(1))
    deq = qp.dequantize(q)
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    _assert_nearest_level(weight, deq, lambda g: (-zeros[g] * scales[g], scales[g], 0, qmax), block)
    assert torch.all(deq[weight == 0] == 0)  # the range includes 0: zeros stay exact


# ---- int with a float zero point (Q4_1 / HQQ) ------------------------------------------------------------------

@SETTINGS
@given(data=weights(partial=True, blocks=[16, 32]), bits=st.integers(2, 8))
def test_int_float_zero_properties(data, bits):
    _check_int_float_zero(*data, bits)


def _check_int_float_zero(weight, block, bits):
    rows, cols = weight.shape
    q = qp.quantize_int_float_zero(weight, bits, block)
    qmax = 2**bits - 1
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.int64
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= qmax
    shape = _expected_scale_shape(rows, cols, block)
    assert tuple(q.scales.shape) == shape and tuple(q.zero_points.shape) == shape
    assert tuple(q.offsets.shape) == shape
    assert int(q.zero_points.min()) >= 0 and int(q.zero_points.max()) <= qmax
    scales = _per_group(q.scales, rows, cols, block)
    assert np.isfinite(scales).all() and np.all(scales > 0)
    deq = qp.dequantize(q)
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    groups = _groups64(weight, block)
    for g, (values, idx) in enumerate(groups):
        v32 = values.astype(np.float32)
        span = v32.max() - v32.min()
        assert scales[g] == (span / np.float32(qmax) if span > 0 else np.float32(1))
    # grid m + S * code, m the block minimum; the stored form S(q - z) + c is the same grid up to rounding
    _assert_nearest_level(weight, deq, lambda g: (groups[g][0].min(), scales[g], 0, qmax), block)
    for g, (values, idx) in enumerate(groups):  # min and max are on the grid: never more than half a step off
        got = np.array([deq.double()[r, c].item() for r, c in idx])
        bound = scales[g] / 2 + 8 * np.finfo(np.float32).eps * (np.abs(values).max() + scales[g] * qmax) + 1e-44
        assert np.all(np.abs(values - got) <= bound)


@pytest.mark.parametrize("block", [qp.PER_CHANNEL, qp.PER_TENSOR])
def test_int_float_zero_refuses_non_block_scales(block):
    with pytest.raises(ValueError, match="block-wise"):
        qp.quantize_int_float_zero(torch.ones(2, 32), 4, block)


# ---- codebook types -------------------------------------------------------------------------------------------

def _check_codebook_result(weight, block, q, codebook, bits):
    rows, cols = weight.shape
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.int64
    entries = codebook.shape[-1]
    assert entries <= 2**bits
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) < entries
    assert tuple(q.scales.shape) == _expected_scale_shape(rows, cols, block)
    assert q.zero_points is None
    scales = _per_group(q.scales, rows, cols, block)
    assert np.isfinite(scales).all() and np.all(scales > 0)
    for g, (values, _) in enumerate(_groups64(weight, block)):  # the group's absmax (1 for an all-zero group)
        absmax = np.abs(values.astype(np.float32)).max()
        assert scales[g] == (absmax if absmax > 0 else 1.0)
    normalized = qp.normalized_groups(weight, block).double().numpy()
    table = codebook.double().numpy()
    table = np.broadcast_to(table, (rows, entries)) if table.ndim == 1 else table
    codes = q.codes.numpy()
    chosen = np.take_along_axis(table, codes, axis=1)
    best = np.abs(normalized[:, :, None] - table[:, None, :]).min(axis=2)
    # nearest entry, up to a midpoint threshold rounded to float32
    assert np.all(np.abs(normalized - chosen) <= best + 4e-7 * (1 + np.abs(normalized))), (normalized, chosen)
    deq = qp.dequantize(q)
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    torch.testing.assert_close(deq.double(), torch.from_numpy(chosen) * torch.from_numpy(
        np.array([[scales[_group_index(r, c, rows, cols, block)] for c in range(cols)] for r in range(rows)])),
        rtol=1e-6, atol=2e-38)  # products below float32's normal range (~1.2e-38) lose their relative precision
    return deq


def _group_index(r, c, rows, cols, block):
    if block == qp.PER_TENSOR:
        return 0
    if block == qp.PER_CHANNEL:
        return r
    return r * math.ceil(cols / block) + c // block


FIXED_CODEBOOKS = {
    "log2": qp.log2_codebook,
    "normal_float": qp.normal_float_codebook,
    "float": qp.float_codebook,
}


@SETTINGS
@given(data=weights(partial=False), bits=st.integers(2, 8), kind=st.sampled_from(sorted(FIXED_CODEBOOKS)))
def test_fixed_codebook_properties(data, bits, kind):
    weight, block = data
    codebook = FIXED_CODEBOOKS[kind](bits)
    assert torch.all(codebook[1:] > codebook[:-1]) and float(codebook.abs().max()) == 1.0
    assert (codebook == 0).any()  # all three have an exact zero
    q = qp.quantize_codebook(weight, codebook, bits, block)
    deq = _check_codebook_result(weight, block, q, codebook, bits)
    assert torch.all(deq[weight == 0] == 0)


@SETTINGS
@given(data=weights(partial=False), bits=st.integers(2, 8))
def test_quantile_codebook_properties(data, bits):
    weight, block = data
    normalized = qp.normalized_groups(weight, block)
    codebook = qp.quantile_codebook(normalized, bits)
    assert codebook.shape == (2**bits,) and torch.all(codebook[1:] >= codebook[:-1])
    assert float(codebook[0]) == float(normalized.min()) and float(codebook[-1]) == float(normalized.max())
    q = qp.quantize_codebook(weight, codebook, bits, block)
    _check_codebook_result(weight, block, q, codebook, bits)


@SETTINGS
@given(data=weights(partial=False), bits=st.integers(2, 6), weighted=st.booleans(), seed=st.integers(0, 1000))
def test_kmeans_codebook_properties(data, bits, weighted, seed):
    weight, block = data
    normalized = qp.normalized_groups(weight, block)
    mass = torch.rand(normalized.shape, generator=torch.Generator().manual_seed(seed)) + 0.01 if weighted else None
    centroids = qp.kmeans_codebook(normalized, bits, mass)
    assert centroids.shape == (weight.shape[0], 2**bits) and torch.isfinite(centroids).all()
    assert torch.all(centroids[:, 1:] >= centroids[:, :-1])
    # means of assigned values (or the linear init): never outside the row's range
    tol = 1e-6
    assert torch.all(centroids >= normalized.amin(dim=1, keepdim=True) - tol)
    assert torch.all(centroids <= normalized.amax(dim=1, keepdim=True) + tol)
    q = qp.quantize_codebook(weight, centroids, bits, block)
    _check_codebook_result(weight, block, q, centroids, bits)


# ---- normalized_groups ----------------------------------------------------------------------------------------

@SETTINGS
@given(data=weights(partial=False))
def test_normalized_groups_properties(data):
    weight, block = data
    normalized = qp.normalized_groups(weight, block)
    assert normalized.shape == weight.shape and torch.isfinite(normalized).all()
    assert float(normalized.abs().max()) <= 1.0
    for values, idx in _groups64(weight, block):
        got = np.array([normalized[r, c].item() for r, c in idx])
        if np.all(values == 0):
            assert np.all(got == 0)
        else:
            assert np.abs(got).max() == 1.0  # x / x is exactly 1 in IEEE arithmetic
            assert np.all(np.sign(got) == np.sign(values))


@SETTINGS
@given(rows=st.integers(1, 9), block=st.sampled_from([16, 32]), extra=st.integers(1, 15), full=st.integers(0, 2))
def test_whole_block_functions_refuse_partial_blocks(rows, block, extra, full):
    weight = torch.ones(rows, block * full + extra)
    for call in (lambda: qp.normalized_groups(weight, block),
                 lambda: qp.quantize_codebook(weight, qp.normal_float_codebook(4), 4, block)):
        with pytest.raises(ValueError, match="does not divide"):
            call()


# ---- known bugs: legitimate finite float32 inputs that break the int quantizers ---------------------------------

def _subnormal_rows():
    """A row of float32 subnormals (and zeros): absmax > 0, but absmax / qmax underflows to a zero scale."""
    tiny = st.sampled_from([0.0, 1e-45, -1e-45, 3e-45, -4e-45, 1e-44])
    return st.tuples(st.integers(1, 3), st.integers(1, 40)).flatmap(
        lambda shape: st.lists(st.lists(tiny, min_size=shape[1], max_size=shape[1]), min_size=shape[0],
                               max_size=shape[0]).map(lambda rows: torch.tensor(rows, dtype=torch.float32)))


SUBNORMAL_ROW = torch.tensor([[1e-45, 0.0, -1e-45, 0.0]])
SUBNORMAL_BUG = ("a group whose absmax is a float32 subnormal gets scale absmax / qmax == 0 (the `absmax > 0` guard "
                 "is passed, the quotient underflows): codes become round(0/0) = NaN, cast to int64 "
                 "-9223372036854775808, outside the k-bit range; the values dequantize to 0 or -1.4e-45")


@pytest.mark.xfail(strict=True, reason=SUBNORMAL_BUG)
@SETTINGS
@given(weight=_subnormal_rows(), bits=st.integers(7, 8), full_range=st.booleans())
@example(weight=SUBNORMAL_ROW, bits=8, full_range=False)
def test_int_symmetric_subnormal_group(weight, bits, full_range):
    _check_int_symmetric(weight, qp.PER_CHANNEL, bits, full_range)


@pytest.mark.xfail(strict=True, reason=SUBNORMAL_BUG)
@SETTINGS
@given(weight=_subnormal_rows(), bits=st.integers(7, 8))
@example(weight=SUBNORMAL_ROW, bits=8)
def test_int_asymmetric_subnormal_group(weight, bits):
    _check_int_asymmetric(weight, qp.PER_CHANNEL, bits)


@pytest.mark.xfail(strict=True, reason=SUBNORMAL_BUG + " (here: span / qmax underflows)")
@SETTINGS
@given(weight=_subnormal_rows(), bits=st.integers(7, 8))
@example(weight=torch.cat([SUBNORMAL_ROW] * 4, dim=1), bits=8)
def test_int_float_zero_subnormal_group(weight, bits):
    _check_int_float_zero(weight, 16, bits)


@pytest.mark.xfail(strict=True, reason="asymmetric min-max: span = max - min overflows to inf in float32 when a "
                   "group holds both signs near float32's limit (e.g. +-3e38), so the scale is inf and every "
                   "value dequantizes to NaN; the symmetric and codebook quantizers handle the same group")
@SETTINGS
@given(high=st.floats(1.8e38, 3.4e38, width=32), low=st.floats(-3.4e38, -1.8e38, width=32), bits=st.integers(2, 8))
@example(high=3e38, low=-3e38, bits=4)
def test_int_asymmetric_span_overflow(high, low, bits):
    _check_int_asymmetric(torch.tensor([[high, low, 1.0, 0.0]], dtype=torch.float32), qp.PER_CHANNEL, bits)

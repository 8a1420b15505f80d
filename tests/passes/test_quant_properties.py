"""Property-based tests of passes/quant_primitives.py: random shapes, block sizes, bit widths and values
(all-zero and constant rows, tiny and large magnitudes, mixed signs; finite float32 only), checked against
plain float64 / numpy references: code ranges, scale and zero-point shapes, finite dequantization,
round-to-nearest optimality and nearest-codebook-entry assignment. Degenerate groups have their own tests at
the end: all float32 subnormals (their scale underflowed to 0) and both signs near float32's limit (the min-max
span overflowed)."""

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
# all-subnormal groups have their own tests below; everything else in +-1e4 is fair game
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


F32_MAX = np.float64(np.finfo(np.float32).max)
SMALLEST_F32 = np.float32(np.nextafter(np.float32(0), np.float32(1)))  # 2^-149, the smallest positive float32


def _reference_scale(quotient: np.float32) -> np.float32:
    """A float32 scale as stored: one that underflowed to 0 (an all-subnormal group) is the smallest positive
    float32 instead, the true scale being at most half of it (so the codes still cover the group)."""
    return SMALLEST_F32 if quotient == 0 else quotient


def _reference_span_scale(high: np.float32, low: np.float32, qmax: int) -> np.float32:
    """(high - low) / qmax in float32 (1 for an empty span); where the float32 span overflows (both signs near
    +-3.4e38), the float64 span's scale rounded down to float32, so that min + qmax * S stays in the range."""
    with np.errstate(over="ignore"):
        span = np.float32(high) - np.float32(low)
    if np.isfinite(span):
        return _reference_scale(span / np.float32(qmax) if span > 0 else np.float32(1))
    exact = (np.float64(high) - np.float64(low)) / qmax
    scale = np.float32(exact)
    return np.nextafter(scale, np.float32(0)) if np.float64(scale) > exact else scale


def _finite_codes(zero: float, scale: float, qmax: int) -> tuple[int, int]:
    """The codes q in 0..qmax whose level (q - z) * S is a finite float32 (all of them unless |S| > F32_MAX / qmax,
    a group spanning nearly +-3.4e38): the levels an artifact can hold."""
    reach = math.floor(F32_MAX / abs(np.float64(scale)))
    return max(0, int(zero) - reach), min(qmax, int(zero) + reach)


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
        expected = _reference_scale(expected)
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
    return q, deq


# ---- int asymmetric (integer zero point) ---------------------------------------------------------------------

@SETTINGS
@given(data=weights(partial=True), bits=st.integers(2, 8))
def test_int_asymmetric_properties(data, bits):
    _check_int_asymmetric(*data, bits)


def _check_zero_point_codes(q, weight, block, qmax):
    """Codes and integer zero points in [0, qmax], one scale and zero point per group, scales finite and > 0;
    returns the per-group scales and zero points."""
    rows, cols = weight.shape
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.int64
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= qmax
    shape = _expected_scale_shape(rows, cols, block)
    assert tuple(q.scales.shape) == shape and tuple(q.zero_points.shape) == shape
    assert int(q.zero_points.min()) >= 0 and int(q.zero_points.max()) <= qmax
    scales, zeros = _per_group(q.scales, rows, cols, block), _per_group(q.zero_points, rows, cols, block)
    assert np.isfinite(scales).all() and np.all(scales > 0)
    return scales, zeros


def _check_int_asymmetric(weight, block, bits):
    q = qp.quantize_int_asymmetric(weight, bits, block)
    qmax = 2**bits - 1
    scales, zeros = _check_zero_point_codes(q, weight, block, qmax)
    assert q.zero_points.dtype == torch.int64
    for g, (values, _) in enumerate(_groups64(weight, block)):
        v32 = values.astype(np.float32)
        expected = _reference_span_scale(max(v32.max(), np.float32(0)), min(v32.min(), np.float32(0)), qmax)
        assert scales[g] == expected, (g, scales[g], expected)
    deq = qp.dequantize(q)
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    # the nearest of the levels a float32 artifact can hold (all 2^k of them but in groups spanning ~+-3.4e38)
    _assert_nearest_level(weight, deq, lambda g: (-zeros[g] * scales[g], scales[g],
                                                  *_finite_codes(zeros[g], scales[g], qmax)), block)
    assert torch.all(deq[weight == 0] == 0)  # the range includes 0: zeros stay exact
    return q, deq


# ---- int with a float zero point (Q4_1 / HQQ) ------------------------------------------------------------------

@SETTINGS
@given(data=weights(partial=True, blocks=[16, 32]), bits=st.integers(2, 8))
def test_int_float_zero_properties(data, bits):
    _check_int_float_zero(*data, bits)


def _check_int_float_zero(weight, block, bits):
    q = qp.quantize_int_float_zero(weight, bits, block)
    qmax = 2**bits - 1
    scales, zeros = _check_zero_point_codes(q, weight, block, qmax)
    assert tuple(q.offsets.shape) == tuple(q.scales.shape)
    assert torch.isfinite(q.offsets).all()
    deq = qp.dequantize(q)
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    groups = _groups64(weight, block)
    for g, (values, idx) in enumerate(groups):
        v32 = values.astype(np.float32)
        expected = _reference_span_scale(v32.max(), v32.min(), qmax)
        assert scales[g] == expected, (g, scales[g], expected)
    # grid m + S * code, m the block minimum; the stored form S(q - z) + c is the same grid up to rounding, its
    # codes those whose k-bit part (q - z) * S is a finite float32 (all of them but in blocks spanning ~+-3.4e38)
    _assert_nearest_level(weight, deq, lambda g: (groups[g][0].min(), scales[g],
                                                  *_finite_codes(zeros[g], scales[g], qmax)), block)
    for g, (values, idx) in enumerate(groups):  # min and max are on the grid: never more than half a step off
        if _finite_codes(zeros[g], scales[g], qmax) != (0, qmax):
            continue  # a level the artifact cannot hold: the nearest-level check above is the bound
        got = np.array([deq.double()[r, c].item() for r, c in idx])
        bound = scales[g] / 2 + 8 * np.finfo(np.float32).eps * (np.abs(values).max() + scales[g] * qmax) + 1e-44
        assert np.all(np.abs(values - got) <= bound)
    return q, deq


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


# ---- degenerate groups: legitimate finite float32 inputs at the edges of the float32 range -------------------

def _subnormal_rows():
    """Rows of float32 subnormals (and zeros): absmax > 0, but absmax / qmax may underflow to 0 (it did give a
    zero scale and codes round(0 / 0) = NaN, cast to int64 -9223372036854775808)."""
    tiny = st.sampled_from([0.0, 1e-45, -1e-45, 3e-45, -4e-45, 1e-44])
    return st.tuples(st.integers(1, 3), st.integers(1, 40)).flatmap(
        lambda shape: st.lists(st.lists(tiny, min_size=shape[1], max_size=shape[1]), min_size=shape[0],
                               max_size=shape[0]).map(lambda rows: torch.tensor(rows, dtype=torch.float32)))


SUBNORMAL_ROW = torch.tensor([[1e-45, 0.0, -1e-45, 0.0]])


def _assert_underflowed_groups_exact(weight, q, deq, block, quotient):
    """Where the float32 scale `quotient(values)` (1 for a group of one value) underflowed to 0, the scale is the
    smallest float32, 2^-149, and every value, an integer multiple of 2^-149, comes back exactly; returns how many
    groups underflowed."""
    rows, cols = weight.shape
    scales = _per_group(q.scales, rows, cols, block)
    count = 0
    for g, (values, idx) in enumerate(_groups64(weight, block)):
        if quotient(values.astype(np.float32)) == 0:
            count += 1
            assert scales[g] == SMALLEST_F32
            assert all(deq[r, c] == weight[r, c] for r, c in idx), (weight, deq)
    return count


def _symmetric_quotient(bits, full_range):
    qmax = 2 ** (bits - 1) - 1
    if full_range:
        return lambda v: v[np.argmax(np.abs(v))] / np.float32(-(qmax + 1)) if np.any(v != 0) else np.float32(1)
    return lambda v: np.abs(v).max() / np.float32(qmax) if np.any(v != 0) else np.float32(1)


def _span_quotient(bits, include_zero):
    def quotient(v):
        low, high = (min(v.min(), 0), max(v.max(), 0)) if include_zero else (v.min(), v.max())
        return (np.float32(high) - np.float32(low)) / np.float32(2**bits - 1) if high > low else np.float32(1)
    return quotient


@SETTINGS
@given(weight=_subnormal_rows(), bits=st.integers(2, 8), full_range=st.booleans())
@example(weight=SUBNORMAL_ROW, bits=8, full_range=False)
@example(weight=SUBNORMAL_ROW, bits=8, full_range=True)
def test_int_symmetric_subnormal_group(weight, bits, full_range):
    q, deq = _check_int_symmetric(weight, qp.PER_CHANNEL, bits, full_range)
    underflowed = _assert_underflowed_groups_exact(weight, q, deq, qp.PER_CHANNEL,
                                                   _symmetric_quotient(bits, full_range))
    if bits >= 7 and (weight != 0).any(dim=1).all():  # absmax <= 7 * 2^-149, qmax >= 63: always underflows
        assert underflowed == weight.shape[0]


@SETTINGS
@given(weight=_subnormal_rows(), bits=st.integers(2, 8))
@example(weight=SUBNORMAL_ROW, bits=8)
def test_int_asymmetric_subnormal_group(weight, bits):
    q, deq = _check_int_asymmetric(weight, qp.PER_CHANNEL, bits)
    underflowed = _assert_underflowed_groups_exact(weight, q, deq, qp.PER_CHANNEL, _span_quotient(bits, True))
    if bits >= 7 and (weight != 0).any(dim=1).all():
        assert underflowed == weight.shape[0]


@SETTINGS
@given(weight=_subnormal_rows(), bits=st.integers(2, 8))
@example(weight=torch.cat([SUBNORMAL_ROW] * 4, dim=1), bits=8)
def test_int_float_zero_subnormal_group(weight, bits):
    q, deq = _check_int_float_zero(weight, 16, bits)
    underflowed = _assert_underflowed_groups_exact(weight, q, deq, 16, _span_quotient(bits, False))
    if bits == 8:  # span <= 14 * 2^-149 < 255 / 2 * 2^-149: every block of two values or more underflows
        assert underflowed == sum(values.min() < values.max() for values, _ in _groups64(weight, 16))


@pytest.mark.parametrize("quantize, codes", [
    (lambda w: qp.quantize_int_symmetric(w, 8, 32, torch.float16), (-127, 127)),
    (lambda w: qp.quantize_int_symmetric(w, 8, 32, torch.float16, full_range=True), (-128, 127)),
    (lambda w: qp.quantize_int_asymmetric(w, 8, 32, torch.float16), (0, 255)),
    (lambda w: qp.quantize_int_float_zero(w, 8, 32, torch.float16), (0, 255)),
    (lambda w: qp.quantize_codebook(w, qp.normal_float_codebook(4), 4, 32, torch.float16), (0, 15)),
], ids=["symmetric", "symmetric-full-range", "asymmetric", "float-zero", "nf4"])
def test_float16_scales_of_tiny_groups(quantize, codes):
    """Weights ~1e-9: normal float32, but the scale underflows float16 (smallest positive 2^-24 ~ 6e-8); it was 0,
    and the codes NaN. Now the smallest float16, and every value within half a step of it."""
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-9
    weight[1] = 0.0  # an all-zero row keeps its scale of 1
    q = quantize(weight)
    step = 2.0**-24
    assert q.scales.dtype == torch.float16
    assert q.scales.float()[[0, 2, 3]].eq(step).all() and q.scales.float()[1].eq(1).all(), q.scales
    assert codes[0] <= int(q.codes.min()) and int(q.codes.max()) <= codes[1]
    deq = qp.dequantize(q)
    assert torch.isfinite(deq).all() and torch.isfinite(qp.normalized_groups(weight, 32, torch.float16)).all()
    assert float((deq - weight).abs().max()) <= step / 2
    assert torch.all(deq[1] == 0)


# float32-exact bounds (hypothesis refuses others at width 32); 3.4e38 is 0.08% below float32's largest value
OVERFLOW = dict(high=st.floats(float(np.float32(1.8e38)), float(np.float32(3.4e38)), width=32),
                low=st.floats(float(np.float32(-3.4e38)), float(np.float32(-1.8e38)), width=32),
                bits=st.integers(2, 8))


@SETTINGS
@given(**OVERFLOW)
@example(high=3e38, low=-3e38, bits=4)
@example(high=3.4e38, low=-3.4e38, bits=2)
def test_int_asymmetric_span_overflow(high, low, bits):
    """max - min overflowed to inf in float32 (scale inf, every value NaN): the span is now taken in float64."""
    weight = torch.tensor([[high, low, 1.0, 0.0]], dtype=torch.float32)
    q, deq = _check_int_asymmetric(weight, qp.PER_CHANNEL, bits)
    assert float(q.scales) < math.inf and float(q.scales) * (2**bits - 1) <= high - np.float64(low)
    # the extremes are never further off than one step (the level beyond them may not be a finite float32)
    assert float((deq[0, :2].double() - weight[0, :2].double()).abs().max()) <= float(q.scales) * (1 + 1e-6)


@SETTINGS
@given(**OVERFLOW, where=st.integers(0, 15))
@example(high=3e38, low=-3e38, bits=4, where=0)
@example(high=3.4e38, low=-3.4e38, bits=2, where=3)
def test_int_float_zero_span_overflow(high, low, bits, where):
    weight = torch.linspace(-1, 1, 32).reshape(1, 32)
    weight[0, where], weight[0, 15 - where] = high, low
    q, deq = _check_int_float_zero(weight, 16, bits)
    assert float(q.scales[0, 0]) * (2**bits - 1) <= high - np.float64(low)
    assert float((deq[0, :16].double() - weight[0, :16].double()).abs().max()) <= float(q.scales[0, 0]) * (1 + 1e-6)

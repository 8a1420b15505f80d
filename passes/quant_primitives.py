"""k-bit quantization math: pure functions on tensors, no modules, no files.

A weight W is [N, K] (nn.Linear: out x in). Scaling groups run along K, the reduction axis, which is the
layout ONNX Runtime's MatMulNBits wants: `block_size` B > 0 cuts each row into K / B blocks, B = 0 means one
group per row (per-channel) and B = -1 one group for the whole tensor (per-tensor).

Every quantizer returns a `Quantized`: integer codes of the same shape as W plus what dequantizes them;
dequantize(q) gives the exact fp32 values the exported artifact computes with.
"""
from dataclasses import dataclass, replace

import torch

PER_CHANNEL, PER_TENSOR = 0, -1


@dataclass
class Quantized:
    # [N, K] integer codes, int64 (int16 once handed over): int types' signed or unsigned levels, or codebook indices
    codes: torch.Tensor
    scales: torch.Tensor  # [N, groups] (per-tensor: [1, 1]) in the stored scale dtype
    zero_points: torch.Tensor | None  # [N, groups] int64, asymmetric int only
    codebook: torch.Tensor | None  # [C] or [N, C] normalized values (codebook types)
    bits: int
    block_size: int  # as given: B, 0 per-channel, -1 per-tensor
    offsets: torch.Tensor | None = None  # [N, groups] float zero points' fractional rest c: w = S(q - z) + c


def group_size(shape: tuple[int, int], block_size: int, partial: bool = False) -> int:
    """Members per scaling group. A block size that does not divide K is an error unless `partial`: then the
    last block of each row is shorter (ONNX DequantizeLinear has ceil(K / B) blocks; MatMulNBits pads too)."""
    rows, cols = shape
    if block_size == PER_TENSOR:
        return rows * cols
    if block_size == PER_CHANNEL:
        return cols
    if block_size <= 0 or (cols % block_size and not partial):
        raise ValueError(f"block size {block_size} does not divide the input dimension {cols}")
    return block_size


def to_groups(weight: torch.Tensor, block_size: int, partial: bool = False) -> torch.Tensor:
    """[N, K] -> [groups_total, G] (row-major, so per-tensor is one group of N*K). With `partial`, the last block
    of each row is padded with zeros, which change no absmax and no min/max range that already includes 0."""
    rows, cols = weight.shape
    size = group_size((rows, cols), block_size, partial)
    if block_size > 0 and cols % size:
        weight = torch.nn.functional.pad(weight, (0, size - cols % size))
    return weight.reshape(-1, size)


def from_groups(values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of to_groups: [groups_total, G] -> [N, K], padding dropped."""
    rows, cols = shape
    return values.reshape(rows, -1)[:, :cols]


def scale_shape(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    rows, cols = shape
    if block_size == PER_TENSOR:
        return (1, 1)
    size = group_size(shape, block_size, partial=True)
    return (rows, -(-cols // size))


def _expand(per_group: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """[N, groups] (or [1, 1]) -> [N, K], each group's value repeated over its members."""
    if block_size == PER_TENSOR:
        return per_group.reshape(1, 1).expand(shape)
    return per_group.repeat_interleave(group_size(shape, block_size, partial=True), dim=1)[:, : shape[1]]


def _store(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their stored dtype first, so codes are chosen against the scale the artifact holds."""
    return scale.to(scale_dtype).float()


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """_store for scales. A group whose scale underflows to 0 in the stored dtype (all its values float32
    subnormals, e.g. absmax 1e-45 / 127, or tiny for float16 scales) takes the dtype's smallest positive value
    instead of 0 (which made its codes round(0 / 0) = NaN): the true scale was at most half of it, so the codes
    stay within half the range and every value within half a step; in float32 every subnormal is an exact
    multiple of 2^-149, so such a group comes back exactly. Every other scale is stored as before, bit for bit."""
    stored = scale.to(scale_dtype)
    info = torch.finfo(scale_dtype)
    smallest = torch.tensor(info.smallest_normal * info.eps, dtype=scale_dtype)  # 2^-149 / 2^-24
    return torch.where(stored == 0, smallest, stored).float()


def _span_scale(high: torch.Tensor, low: torch.Tensor, qmax: int) -> torch.Tensor:
    """(high - low) / qmax per group (1 for an empty span), in float32 as ever. A group holding both signs near
    float32's limit (e.g. +-3e38) overflows the float32 span to inf: there the span is taken in float64 and its
    scale rounded down to float32 (so that min + qmax * S stays inside the group's range)."""
    span = high - low
    scale = torch.where(span > 0, span / qmax, torch.ones_like(span))
    wide = torch.isinf(span)
    if bool(wide.any()):
        exact = (high.double() - low.double()) / qmax
        down = exact.float()
        down = torch.where(down.double() > exact, torch.nextafter(down, torch.zeros_like(down)), down)
        scale = torch.where(wide, down, scale)
    return scale


def _level_reach(scale: torch.Tensor, qmax: int) -> torch.Tensor | None:
    """How many steps S from the zero point a level (q - z) * S may lie and stay a finite float32, per group; None
    where every group reaches its whole range (any group not within a few steps of float32's limit)."""
    reach = torch.floor(torch.finfo(torch.float32).max / scale.double().abs())
    return None if bool((reach >= qmax).all()) else reach


def _clip_to_reach(codes: torch.Tensor, zero: torch.Tensor, reach: torch.Tensor | None, qmax: int) -> torch.Tensor:
    """Codes whose level (q - z) * S would overflow float32 take the last finite level instead (the nearest one
    the artifact can hold); a no-op unless _level_reach found such a group."""
    if reach is None:
        return codes
    low = (zero.double() - reach).clamp(min=0).float()[:, None]
    high = (zero.double() + reach).clamp(max=qmax).float()[:, None]
    return torch.minimum(torch.maximum(codes, low), high)


# ---- linear / int ----------------------------------------------------------------------------------------

def quantize_int_symmetric(weight: torch.Tensor, bits: int, block_size: int,
                           scale_dtype: torch.dtype = torch.float32, full_range: bool = False) -> Quantized:
    """Absmax: levels -(2^(k-1)-1) .. 2^(k-1)-1, code = round(w / S), S = absmax / (2^(k-1)-1).

    full_range uses the extra level -2^(k-1) too (llama.cpp Q4_0, ONNX Runtime's MatMulNBitsQuantizer): the
    block's signed extreme m maps to -2^(k-1), S = m / -2^(k-1) (S may be negative), codes clipped to the type."""
    qmax = 2 ** (bits - 1) - 1
    groups = to_groups(weight.float(), block_size, partial=True)
    if full_range:
        extreme = torch.gather(groups, 1, groups.abs().argmax(dim=1, keepdim=True))[:, 0]
        scale = _store_scale(torch.where(extreme != 0, extreme / -(qmax + 1), torch.ones_like(extreme)),
                             scale_dtype)
        codes = torch.clamp(torch.round(groups / scale[:, None]), -qmax - 1, qmax)
        shape = scale_shape(tuple(weight.shape), block_size)
        return Quantized(from_groups(codes, tuple(weight.shape)).long(), scale.reshape(shape).to(scale_dtype), None,
                         None, bits, block_size)
    absmax = groups.abs().amax(dim=1)
    scale = _store_scale(torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)), scale_dtype)
    codes = torch.clamp(torch.round(groups / scale[:, None]), -qmax, qmax)
    shape = scale_shape(tuple(weight.shape), block_size)
    return Quantized(from_groups(codes, tuple(weight.shape)).long(), scale.reshape(shape).to(scale_dtype), None,
                     None, bits, block_size)


def quantize_int_asymmetric(weight: torch.Tensor, bits: int, block_size: int,
                            scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """Min-max: S = (max - min) / (2^k - 1), Z = round(-min / S), q = clip(round(w / S) + Z, 0, 2^k - 1).
    The range always includes 0 so that zero (padding, pruned weights) stays exact."""
    qmax = 2**bits - 1
    groups = to_groups(weight.float(), block_size, partial=True)
    low = groups.amin(dim=1).clamp(max=0)
    high = groups.amax(dim=1).clamp(min=0)
    scale = _store_scale(_span_scale(high, low, qmax), scale_dtype)
    zero = torch.clamp(torch.round(-low / scale), 0, qmax)
    codes = torch.clamp(torch.round(groups / scale[:, None]) + zero[:, None], 0, qmax)
    codes = _clip_to_reach(codes, zero, _level_reach(scale, qmax), qmax)
    shape = scale_shape(tuple(weight.shape), block_size)
    return Quantized(from_groups(codes, tuple(weight.shape)).long(), scale.reshape(shape).to(scale_dtype),
                     zero.reshape(shape).long(), None, bits, block_size)


def quantize_int_float_zero(weight: torch.Tensor, bits: int, block_size: int,
                            scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """Min-max with a float zero point (llama.cpp's Q4_1, HQQ): w = S * q + m, m = the block's minimum and
    S = (max - min) / (2^k - 1); q = clip(round((w - m) / S), 0, 2^k - 1). Unlike an integer zero point, the grid
    is not shifted to put 0 on a level, so weights that already sit on such a grid (a Q4_1 GGUF at B = 32) come
    back exactly. Blocks only (B > 0); a shorter last block is padded with its own last value, which changes
    neither its min nor its max.

    Stored as w = S * (q - z) + c: z = the integer zero point nearest -m / S and c = m + S * z the fractional
    rest (|c| <= S / 2 when the block spans 0). Same weights, but the k-bit part stays centred, which keeps
    ONNX Runtime's int8-activation kernel (accuracy level 4) as accurate as with a plain zero point."""
    if block_size <= 0:
        raise ValueError("a float zero point needs block-wise scales (block_size > 0)")
    qmax = 2**bits - 1
    rows, cols = weight.shape
    weight = weight.float()
    if cols % block_size:
        weight = torch.cat([weight, weight[:, -1:].expand(rows, block_size - cols % block_size)], dim=1)
    groups = weight.reshape(-1, block_size)
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    scale = _store_scale(_span_scale(high, low, qmax), scale_dtype)
    minimum = _store(low, scale_dtype)
    codes = torch.clamp(torch.round((groups - minimum[:, None]) / scale[:, None]), 0, qmax)
    zero = torch.clamp(torch.round(-minimum / scale), 0, qmax)
    reach = _level_reach(scale, qmax)
    if reach is not None:  # a block near +-3.4e38: z * S and (q - z) * S must stay finite float32
        zero = torch.minimum(zero, reach.float())
        codes = _clip_to_reach(codes, zero, reach, qmax)
    rest = _store(minimum + scale * zero, scale_dtype)
    shape = scale_shape((rows, cols), block_size)
    return Quantized(from_groups(codes, (rows, cols)).long(), scale.reshape(shape).to(scale_dtype),
                     zero.reshape(shape).long(), None, bits, block_size, rest.reshape(shape).to(scale_dtype))


# ---- scale search ---------------------------------------------------------------------------------------

# candidate scales as multiples of the plain one (absmax / min-max): llama.cpp's make_qx_quants tries
# (n + 0.1 i) / n for i in -9..9 around the block maximum; this grid spans the same 0.9..1.1 and clips harder
SEARCH_RATIOS = (0.70, 0.75, 0.80, 0.84, 0.87, 0.90, 0.92, 0.94, 0.96, 0.98, 1.00, 1.02, 1.04, 1.07, 1.10)


def _group_importance(importance: torch.Tensor | None, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Per-input-column weights [K] (e.g. the calibration inputs' mean x^2) laid out as the weight's groups
    [groups_total, G]; None: every member counts 1. A partial last block's padding counts 0."""
    rows, cols = shape
    if importance is None:
        importance = torch.ones(cols)
    full = importance.float().reshape(1, cols).expand(rows, cols)
    size = group_size(shape, block_size, partial=True)
    if block_size > 0 and cols % size:
        full = torch.nn.functional.pad(full, (0, size - cols % size))
    return full.reshape(-1, size)


def _levels_error(groups: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor,
                  scale_dtype: torch.dtype) -> torch.Tensor:
    """Per group: sum of weights * (value - the value dequantize() gives back)^2."""
    approx = (levels * scale[:, None]).to(scale_dtype).float()
    return (weights * (groups - approx) ** 2).sum(dim=1)


def quantize_int_searched(weight: torch.Tensor, bits: int, block_size: int,
                          scale_dtype: torch.dtype = torch.float32, symmetric: bool = True, full_range: bool = False,
                          importance: torch.Tensor | None = None,
                          ratios: tuple[float, ...] = SEARCH_RATIOS) -> Quantized:
    """Int codes whose group scales minimise the group's (importance-weighted) squared reconstruction error
    instead of covering its absmax / min-max: llama.cpp's K-quant scale search. For each candidate scale
    r * S_plain (asymmetric: with the zero point nearest the group's minimum, or centring its middle) the codes are
    rounded and the scale refitted by least squares for them (S = sum w x l / sum w l^2, l = q - z, whose error is
    sum w x^2 - (sum w x l)^2 / sum w l^2); the best candidate's refit scale is stored and the codes rounded again
    against it. A group keeps the plain quantizer's result (quantize_int_symmetric / quantize_int_asymmetric)
    unless that error, measured on what dequantize() gives back, is lower: no group comes out worse than plain.
    `importance` [K] weights each input column (None: all 1)."""
    shape = tuple(weight.shape)
    plain = quantize_int_symmetric(weight, bits, block_size, scale_dtype, full_range) if symmetric else \
        quantize_int_asymmetric(weight, bits, block_size, scale_dtype)
    groups = to_groups(weight.float(), block_size, partial=True)
    weights = None if importance is None else _group_importance(importance, shape, block_size)
    weighted = groups if weights is None else weights * groups
    if symmetric:
        low, high = -(2 ** (bits - 1)) + (0 if full_range else 1), 2 ** (bits - 1) - 1
        anchors = [None]
    else:
        low, high = 0, 2**bits - 1
        anchors = ["minimum", "middle"]
    base = plain.scales.float().reshape(-1)  # negative for full range (the extreme on the lowest level)
    minimum, middle = groups.amin(dim=1), (groups.amin(dim=1) + groups.amax(dim=1)) / 2
    best_gain = torch.full_like(base, -1.0, dtype=torch.float64)  # (sum w x l)^2 / sum w l^2: the error it removes
    best_scale, best_zero = base.double(), torch.zeros_like(base)
    for ratio in ratios:
        for anchor in anchors:
            scale = base * ratio
            zero = torch.zeros_like(scale) if anchor is None else torch.clamp(torch.round(
                -minimum / scale if anchor == "minimum" else (high + low) / 2 - middle / scale), low, high)
            levels = torch.clamp(torch.round(groups / scale[:, None]) + zero[:, None], low, high) - zero[:, None]
            dot = (weighted * levels).sum(dim=1, dtype=torch.float64)  # float64: rounding decides no choice
            norm = (levels * levels if weights is None else weights * levels * levels).sum(dim=1, dtype=torch.float64)
            gain = torch.where(norm > 0, dot * dot / norm.clamp(min=1e-300), torch.zeros_like(dot))
            better = gain > best_gain
            best_gain = torch.where(better, gain, best_gain)
            best_scale = torch.where(better, torch.where(norm > 0, dot / norm.clamp(min=1e-300), scale.double()),
                                     best_scale)
            best_zero = torch.where(better, zero, best_zero)
    best_scale = best_scale.float()
    scale = _store_scale(torch.where(torch.isfinite(best_scale) & (best_scale != 0), best_scale, base), scale_dtype)
    codes = torch.clamp(torch.round(groups / scale[:, None]) + best_zero[:, None], low, high)
    plain_codes = to_groups(plain.codes.float(), block_size, partial=True)
    plain_zero = torch.zeros_like(base) if symmetric else plain.zero_points.float().reshape(-1)
    ones = torch.ones_like(groups) if weights is None else weights
    error = _levels_error(groups, ones, codes - best_zero[:, None], scale, scale_dtype)
    plain_error = _levels_error(groups, ones, plain_codes - plain_zero[:, None], base, scale_dtype)
    searched = error < plain_error
    codes = torch.where(searched[:, None], codes, plain_codes)
    scale = torch.where(searched, scale, base)
    out_shape = scale_shape(shape, block_size)
    zero_points = None if symmetric else torch.where(searched, best_zero, plain_zero).reshape(out_shape).long()
    return Quantized(from_groups(codes, shape).long(), scale.reshape(out_shape).to(scale_dtype), zero_points, None,
                     bits, block_size)


def int_codes_from_scale(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                         full_range: bool = False):
    """Codes of `values` against given scales (GPTQ quantizes one column at a time with fixed group scales)."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(values / scale), -qmax - int(full_range), qmax)
    return torch.clamp(torch.round(values / scale) + zero, 0, 2**bits - 1)


# ---- codebook types (log2, float ExMy, NormalFloat, quantile, k-means) ------------------------------------

def log2_codebook(bits: int) -> torch.Tensor:
    """Sign + power of two: ±2^e for the 2^(k-1) - 1 largest exponents e <= 0, plus an exact zero."""
    magnitudes = 2.0 ** -torch.arange(2 ** (bits - 1) - 1, dtype=torch.float64)
    return torch.cat([-magnitudes, torch.zeros(1, dtype=torch.float64), magnitudes]).sort().values.float()


def float_codebook(bits: int, exponent_bits: int | None = None) -> torch.Tensor:
    """Signed ExMy as bitsandbytes' create_fp8_map: bias 2^(E-1), subnormals 2^-bias * m/2^M,
    normals 2^-(e-bias-1) * (1 + m/2^M); normalized by the largest value. Default E = ceil(k/2)."""
    exponent_bits = (bits + 1) // 2 if exponent_bits is None else exponent_bits
    mantissa_bits = bits - 1 - exponent_bits
    if exponent_bits < 1 or mantissa_bits < 0:
        raise ValueError(f"float with {bits} bits cannot have {exponent_bits} exponent bits (1 sign bit)")
    bias = 2 ** (exponent_bits - 1)
    values = []
    for exponent in range(2**exponent_bits):
        for mantissa in range(2**mantissa_bits):
            fraction = mantissa / 2**mantissa_bits
            if exponent == 0:
                values.append(fraction * 2.0**-bias)
            else:
                values.append((1 + fraction) * 2.0 ** -(exponent - bias - 1))
    positive = torch.tensor(values, dtype=torch.float64)
    table = torch.cat([positive, -positive]).unique()
    return (table / table.max()).float()


NF_OFFSET = 0.9677  # QLoRA's: the outermost quantile used, so that ±1 are real values


def normal_float_codebook(bits: int) -> torch.Tensor:
    """NF-k: quantiles of N(0, 1), 2^(k-1) positive and 2^(k-1) - 1 negative, plus zero, scaled to [-1, 1]."""
    half = 2 ** (bits - 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    table = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (table / table.max()).float()


def quantile_codebook(normalized: torch.Tensor, bits: int) -> torch.Tensor:
    """Empirical quantiles of the (absmax-normalized) values at 2^k evenly spaced probabilities 0 .. 1.

    The reference's midpoint form, (Q(i/(2^k+1)) + Q((i+1)/(2^k+1))) / 2 for i < 2^k, leaves one tail without a
    value; with absmax blocks every block's largest weight sits at ±1, and on N(0, 1) data at B = 64 that form
    measured 36e-3 relative MSE against 13.5e-3 for this one (reference figure 14.3e-3)."""
    probs = torch.linspace(0, 1, 2**bits, dtype=torch.float64)
    flat = normalized.reshape(-1).double()
    if flat.numel() > 2**24:  # torch.quantile's input limit; a strided subsample keeps it deterministic
        flat = flat[:: flat.numel() // 2**24 + 1]
    return torch.quantile(flat, probs).sort().values.float()


def nearest_codes(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value, via thresholds at the midpoints of the sorted codebook.
    codebook [C] for all rows, or [N, C] one per row of `values` [N, ...]."""
    if codebook.dim() == 1:
        return torch.bucketize(values.contiguous(), (codebook[1:] + codebook[:-1]) / 2)
    rows = values.shape[0]
    thresholds = ((codebook[:, 1:] + codebook[:, :-1]) / 2).contiguous()
    return torch.searchsorted(thresholds, values.reshape(rows, -1).contiguous()).reshape(values.shape)


def kmeans_codebook(values: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                    iterations: int = 25) -> torch.Tensor:
    """Lloyd's k-means with 2^k centroids per row of `values` [R, M], linear init over [min, max], optional
    per-value weights [R, M] (e.g. activation norms). Vectorized over rows. Returns sorted centroids [R, 2^k]."""
    values = values.float()
    weights = torch.ones_like(values) if weights is None else weights.float().expand_as(values)
    count = 2**bits
    low, high = values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True)
    centroids = low + (high - low) * torch.linspace(0, 1, count)[None, :]
    assignment = None
    for _ in range(iterations):
        new_assignment = nearest_codes(values, centroids)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        mass = torch.zeros_like(centroids).scatter_add_(1, assignment, weights)
        total = torch.zeros_like(centroids).scatter_add_(1, assignment, weights * values)
        centroids = torch.where(mass > 0, total / mass.clamp(min=1e-30), centroids).sort(dim=1).values
    return centroids


def quantize_codebook(weight: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int,
                      scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """Absmax-scale each group to [-1, 1], then the nearest codebook value. codebook [C] or [N, C]."""
    groups = to_groups(weight.float(), block_size)
    absmax = groups.abs().amax(dim=1)
    scale = _store_scale(torch.where(absmax > 0, absmax, torch.ones_like(absmax)), scale_dtype)
    normalized = (groups / scale[:, None]).reshape(weight.shape)
    codes = nearest_codes(normalized, codebook)
    shape = scale_shape(tuple(weight.shape), block_size)
    return Quantized(codes.long(), scale.reshape(shape).to(scale_dtype), None, codebook.float(), bits, block_size)


def normalized_groups(weight: torch.Tensor, block_size: int, scale_dtype: torch.dtype = torch.float32):
    """w / absmax of its group, [N, K]: what data-dependent codebooks (quantile, k-means) are fitted to."""
    groups = to_groups(weight.float(), block_size)
    absmax = groups.abs().amax(dim=1)
    scale = _store_scale(torch.where(absmax > 0, absmax, torch.ones_like(absmax)), scale_dtype)
    return (groups / scale[:, None]).reshape(weight.shape)


# weights per step of dequantize / relative_mse on a large weight: their temporaries (int64 codes, expanded
# scales, products) follow this, not the weight; each row's values are the same either way
ROW_CHUNK_WEIGHTS = 1 << 24


def _row_chunks(shape: tuple[int, ...], block_size: int) -> list[slice] | None:
    rows = max(1, ROW_CHUNK_WEIGHTS // max(1, shape[1]))
    if shape[0] <= rows or block_size == PER_TENSOR:
        return None
    return [slice(start, start + rows) for start in range(0, shape[0], rows)]


def _rows_of(q: Quantized, rows: slice) -> Quantized:
    def cut(value):
        return None if value is None else value[rows]
    codebook = q.codebook[rows] if q.codebook is not None and q.codebook.dim() == 2 else q.codebook
    return replace(q, codes=q.codes[rows], scales=q.scales[rows], zero_points=cut(q.zero_points),
                   offsets=cut(q.offsets), codebook=codebook)


def row_chunks(q: Quantized) -> list[tuple[slice, Quantized]]:
    """`q` as (rows, their Quantized) pieces of at most ROW_CHUNK_WEIGHTS weights (one piece when small or
    per-tensor): what dequantizes a large weight without its temporaries at full size."""
    chunks = _row_chunks(tuple(q.codes.shape), q.block_size)
    return [(slice(None), q)] if chunks is None else [(rows, _rows_of(q, rows)) for rows in chunks]


def dequantize(q: Quantized) -> torch.Tensor:
    chunks = _row_chunks(tuple(q.codes.shape), q.block_size)
    if chunks is None:
        return _dequantize(q)
    out = torch.empty(tuple(q.codes.shape), dtype=torch.float32)
    for rows in chunks:
        out[rows] = _dequantize(_rows_of(q, rows))
    return out


def _dequantize(q: Quantized) -> torch.Tensor:
    if q.codes.dtype != torch.int64:  # compact codes (e.g. int16 in the quantize pass's records)
        q = replace(q, codes=q.codes.long())
    shape = tuple(q.codes.shape)
    scale = _expand(q.scales.float(), shape, q.block_size)
    if q.codebook is not None:
        if q.codebook.dim() == 1:
            return q.codebook[q.codes] * scale
        return torch.gather(q.codebook, 1, q.codes) * scale
    levels = q.codes if q.zero_points is None else q.codes - _expand(q.zero_points, shape, q.block_size)
    # DequantizeLinear's output has the scale's dtype: with fp16 scales the artifact holds fp16 weights
    values = (levels.float() * scale).to(q.scales.dtype).float()
    if q.offsets is not None:  # the artifact adds these in fp32 through a block-sum MatMul (exporters.qdq)
        values = values + _expand(q.offsets.float(), shape, q.block_size)
    return values


def relative_mse(weight: torch.Tensor, approx: torch.Tensor) -> float:
    chunks = _row_chunks(tuple(weight.shape), PER_CHANNEL) if weight.dim() == 2 else None
    if chunks is None:
        return float(((weight - approx) ** 2).mean() / (weight**2).mean())
    error = sum(float(((weight[rows] - approx[rows]).double() ** 2).sum()) for rows in chunks)
    return error / sum(float((weight[rows].double() ** 2).sum()) for rows in chunks)

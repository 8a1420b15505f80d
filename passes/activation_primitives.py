"""Activation quantization math: the range observers, the 8-bit parameters they give, and fake quantization
exactly as ONNX's QuantizeLinear / DynamicQuantizeLinear define it (round half to even, saturate), so that the
torch model and ONNX Runtime's integer kernels see the same codes. Pure tensor functions, no module knowledge.

Static: one (scale, zero point) per Linear input, from calibration data. Dynamic: the range of each call's whole
input tensor (DynamicQuantizeLinear: uint8, range widened to include 0)."""
import math

import torch

OBSERVERS = ("minmax", "percentile", "mse", "entropy")
ACTIVATION_DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
SAMPLE_LIMIT = 1 << 20  # values kept per layer for the percentile / MSE / entropy observers
MSE_SEARCH_LIMIT = 1 << 14  # of which the MSE search scores this many per candidate range (81 candidates)
ENTROPY_BINS, ENTROPY_LEVELS = 2048, 128  # TensorRT's KL calibration: 2048-bin |x| histogram into 128 levels


def sample_values(x: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` values of x, evenly strided (deterministic: the same tensor gives the same sample)."""
    flat = x.detach().reshape(-1).float()
    stride = max(1, math.ceil(flat.numel() / limit))
    return flat[::stride].clone()


def observed_range(samples: torch.Tensor, low: float, high: float, observer: str, percentile: float,
                   dtype: str) -> tuple[float, float]:
    """The (low, high) the activations are quantized over. `low`, `high`: the exact extremes seen;
    `samples`: values drawn from the same batches (for the observers that clip)."""
    if observer == "minmax" or samples.numel() == 0:
        return low, high
    if observer == "percentile":
        if dtype == "int8":  # symmetric: one threshold on |x|
            t = _quantile(samples.abs(), percentile / 100)
            return max(low, -t), min(high, t)
        return _quantile(samples, 1 - percentile / 100), _quantile(samples, percentile / 100)
    if observer == "mse":
        return _mse_range(samples, low, high, dtype)
    t = _entropy_threshold(samples.abs())
    return max(low, -t), min(high, t)


def _quantile(values: torch.Tensor, q: float) -> float:
    ordered = values.sort().values
    return float(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))])


def _mse_range(samples: torch.Tensor, low: float, high: float, dtype: str) -> tuple[float, float]:
    """The range, shrunk towards 0 by one factor in [0.2, 1], whose fake quantization of the samples has the
    least squared error."""
    best, best_error = (low, high), math.inf
    samples = sample_values(samples, MSE_SEARCH_LIMIT)
    for factor in torch.linspace(0.2, 1.0, 81).tolist():
        scale, zero = static_qparams(low * factor, high * factor, dtype)
        error = float(((fake_quantize(samples, scale, zero, dtype) - samples) ** 2).mean())
        if error < best_error:
            best, best_error = (low * factor, high * factor), error
    return best


def _entropy_threshold(magnitudes: torch.Tensor) -> float:
    """The |x| threshold whose 128-level quantization of the histogram loses the least information
    (KL(P || Q), P the clipped histogram with the tail folded into its last bin)."""
    top = float(magnitudes.max())
    if top == 0:
        return 0.0
    hist = torch.histc(magnitudes, ENTROPY_BINS, 0, top).double()
    width = top / ENTROPY_BINS
    best, best_kl = top, math.inf
    for edge in range(ENTROPY_LEVELS, ENTROPY_BINS + 1, 16):
        p = hist[:edge].clone()
        p[-1] += hist[edge:].sum()
        # Q: P merged into 128 levels, each level's mass spread back over the bins P uses (so q > 0 where p > 0)
        groups = torch.tensor_split(p, ENTROPY_LEVELS)
        q = torch.cat([torch.where(g > 0, g.sum() / max(int((g > 0).sum()), 1), 0.0) for g in groups])
        mask = p > 0
        p_n, q_n = p[mask] / p.sum(), q[mask] / q.sum()
        kl = float((p_n * (p_n / q_n).log()).sum())
        if kl < best_kl:
            best, best_kl = edge * width, kl
    return best


def static_qparams(low: float, high: float, dtype: str) -> tuple[float, int]:
    """(scale, zero point) covering [low, high] widened to include 0 (so that 0, e.g. padding, is exact):
    uint8 asymmetric (QuantizeLinear's default type) or int8 symmetric (zero point 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    qmin, qmax = ACTIVATION_DTYPES[dtype]
    if dtype == "int8":
        scale = max(-low, high) / qmax
        zero = 0
    else:
        scale = (high - low) / (qmax - qmin)
        zero = 0 if scale == 0 else int(min(max(round(qmin - low / scale), qmin), qmax))
    scale = float(torch.tensor(scale, dtype=torch.float32))  # stored as a float32 initializer
    return (scale if scale > 0 else 1.0), zero  # an all-zero input: any scale represents it exactly


def fake_quantize(x: torch.Tensor, scale: float, zero: int, dtype: str) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)) in float32: (saturate(round(x / scale) + zero) - zero) * scale."""
    qmin, qmax = ACTIVATION_DTYPES[dtype]
    scale_t = torch.tensor(scale, dtype=torch.float32)
    codes = torch.clamp(torch.round(x.float() / scale_t) + zero, qmin, qmax)
    return ((codes - zero) * scale_t).to(x.dtype)


def fake_quantize_dynamic(x: torch.Tensor) -> torch.Tensor:
    """DequantizeLinear(DynamicQuantizeLinear(x)): uint8 over [min(x, 0), max(x, 0)] of the whole tensor, the
    scale and zero point computed in float32 as the ONNX definition does."""
    values = x.float()
    zero_f = torch.zeros((), dtype=torch.float32)
    low, high = torch.minimum(values.min(), zero_f), torch.maximum(values.max(), zero_f)
    if bool(high == low):
        return x.clone()  # all zeros
    scale = (high - low) / 255
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    codes = torch.clamp(torch.round(values / scale) + zero, 0, 255)
    return ((codes - zero) * scale).to(x.dtype)


def smoothing_scales(input_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|X_j|^α / max|W_j|^(1-α): x / s and W * s give the same product
    with the activation outliers moved into the weights (α = 0.5 splits them evenly)."""
    s = input_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5).float()

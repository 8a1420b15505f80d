"""Activation quantization of nn.Linear inputs (W8A8) on the torch side: SmoothQuant's migration, calibration of
static ranges with an observer, and fake quantization while the model is scored, so that the torch column of the
report computes what ONNX Runtime's integer kernels compute (passes.activation_primitives has the math).

What each layer gets travels with its weight record (QuantizedLayer.activation) to the exporter, which writes
the same QuantizeLinear -> DequantizeLinear (or DynamicQuantizeLinear -> DequantizeLinear) in front of its MatMul
and, for SmoothQuant, the division by the smoothing scales (folded into a preceding LayerNormalization where the
graph allows). Calibration data only: nothing here sees held-out data."""
import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from passes import activation_primitives as ap


@dataclass(frozen=True)
class ActivationQuant:
    """How one Linear's input is quantized: `mode` static (scale and zero point fixed from calibration) or dynamic
    (per call); `smooth`: SmoothQuant's per-input-channel scales s (the layer computes (x / s) @ (W * s)ᵀ, its
    weight already holding W * s), or None."""
    mode: str
    dtype: str = "uint8"
    scale: float = 1.0
    zero_point: int = 0
    observed: tuple[float, float] | None = None  # the extremes seen on calibration data (of x / s)
    range: tuple[float, float] | None = None  # what the observer kept
    smooth: torch.Tensor | None = None

    def record(self, module: str) -> dict:
        entry = {"module": module, "mode": self.mode}
        if self.mode == "static":
            entry.update(dtype=self.dtype, scale=self.scale, zero_point=self.zero_point,
                         observed=list(self.observed), range=list(self.range))
        if self.smooth is not None:
            entry["smooth"] = {"min": float(self.smooth.min()), "max": float(self.smooth.max())}
        return entry


def _run(model: nn.Module, calibration: list[tuple]) -> None:
    with torch.no_grad():
        for batch in calibration:
            model(*batch)


@contextlib.contextmanager
def _hooks(pairs):
    """Forward pre-hooks [(module, hook)] for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _divide_by(smooth: torch.Tensor):
    def hook(_, args):
        return (args[0] / smooth.to(args[0].dtype),) + tuple(args[1:])
    return hook


def dividing_inputs(layers: dict[str, nn.Linear], smooth: dict[str, torch.Tensor]):
    """Context: the smoothed layers see x / s (their weights hold W * s), e.g. while GPTQ measures inputs."""
    return _hooks([(layers[name], _divide_by(s)) for name, s in smooth.items()])


def shared_inputs(model: nn.Module, layers: dict[str, nn.Linear], batch: tuple) -> list[list[str]]:
    """Groups of layers that read the very same input tensor (a block's q/k/v, a gated MLP's gate/up): they must
    share one smoothing vector, as the exporter divides that tensor once."""
    seen: dict[int, list[str]] = {}
    keep = []  # the inputs stay alive until the pass ends, so that no id is reused

    def hook_for(name):
        def hook(_, args):
            keep.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)
        return hook

    with _hooks([(module, hook_for(name)) for name, module in layers.items()]):
        _run(model, [batch])
    groups, placed = [], set()
    for names in seen.values():
        fresh = [n for n in dict.fromkeys(names) if n not in placed]
        if fresh:
            groups.append(fresh)
            placed.update(fresh)
    return groups + [[n] for n in layers if n not in placed]


def channel_absmax(model: nn.Module, layers: dict[str, nn.Linear], calibration: list[tuple]) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of each layer over the calibration batches."""
    found = {name: torch.zeros(module.in_features) for name, module in layers.items()}

    def hook_for(name, module):
        def hook(_, args):
            x = args[0].detach().reshape(-1, module.in_features).abs().float()
            found[name] = torch.maximum(found[name], x.amax(dim=0))
        return hook

    with _hooks([(module, hook_for(name, module)) for name, module in layers.items()]):
        _run(model, calibration)
    return found


def smooth_layers(model: nn.Module, layers: dict[str, nn.Linear], calibration: list[tuple],
                  alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant: per group of layers sharing an input, s from that input's channel maxima and the group's
    weight column maxima; the weights become W * s in place. Returns {layer: s}. A group with a weight that
    another module also holds (an lm_head tied to the token embedding) is not smoothed: scaling it would scale
    the embedding's rows too."""
    groups = shared_inputs(model, layers, calibration[0])
    absmax = channel_absmax(model, layers, calibration)
    holders = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    smooth = {}
    for group in groups:
        if any(holders[id(layers[name].weight)] > 1 for name in group):
            continue
        weights = torch.cat([layers[name].weight.detach().float() for name in group])
        s = ap.smoothing_scales(absmax[group[0]], weights.abs().amax(dim=0), alpha)
        for name in group:
            module = layers[name]
            module.weight.data = (module.weight.detach().float() * s).to(module.weight.dtype)
            smooth[name] = s
    return smooth


def calibrate_static(model: nn.Module, layers: dict[str, nn.Linear], calibration: list[tuple],
                     smooth: dict[str, torch.Tensor], observer: str, percentile: float,
                     dtype: str) -> dict[str, ActivationQuant]:
    """One sweep of the calibration batches: each layer's input extremes and a strided sample of its values
    (after the smoothing division), then the observer's range and its 8-bit scale and zero point."""
    low = {name: float("inf") for name in layers}
    high = {name: float("-inf") for name in layers}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    per_batch = max(1, ap.SAMPLE_LIMIT // max(1, len(calibration)))

    def hook_for(name):
        def hook(_, args):
            x = args[0].detach()
            low[name] = min(low[name], float(x.min()))
            high[name] = max(high[name], float(x.max()))
            if observer != "minmax":
                samples[name].append(ap.sample_values(x, per_batch))
        return hook

    with dividing_inputs(layers, smooth), _hooks([(module, hook_for(name)) for name, module in layers.items()]):
        _run(model, calibration)
    found = {}
    for name in layers:
        values = torch.cat(samples[name]) if samples[name] else torch.empty(0)
        kept = ap.observed_range(values, low[name], high[name], observer, percentile, dtype)
        scale, zero = ap.static_qparams(*kept, dtype)
        found[name] = ActivationQuant("static", dtype, scale, zero, (low[name], high[name]), kept, smooth.get(name))
    return found


def _fake_quantizing(quant: ActivationQuant):
    def hook(_, args):
        x = args[0] if quant.smooth is None else args[0] / quant.smooth.to(args[0].dtype)
        x = ap.fake_quantize(x, quant.scale, quant.zero_point, quant.dtype) if quant.mode == "static" \
            else ap.fake_quantize_dynamic(x)
        return (x,) + tuple(args[1:])
    return hook


def fake_quantized_activations(model: nn.Module, quantized: dict):
    """Context: every layer whose quantize record carries an activation setting sees its input as the artifact's
    QuantizeLinear -> DequantizeLinear leaves it (smoothing division first). A no-op without such records."""
    modules = dict(model.named_modules())
    pairs = [(modules[name], _fake_quantizing(layer.activation)) for name, layer in quantized.items()
             if getattr(layer, "activation", None) is not None and name in modules]
    return _hooks(pairs)

"""SmoothQuant (Xiao et al. 2023) as a pass of its own: per input channel j, s_j = max|x_j|^α / max|W_j|^(1-α)
moves the activations' outliers into the weights, which become W * s while the inputs are divided by s, so the
model computes what it did ((x / s) @ (W s)ᵀ = x @ Wᵀ) and integer activations (the quantize pass's W8A8) lose
less. Layers that read one tensor (q/k/v, gate/up) share one s; a weight another module also holds (a tied head)
is left alone.

Between this pass and the quantize pass the model carries the division as forward pre-hooks (so the metric
measured after this pass is the model's own); the quantize pass takes them over with take_smoothing(): it
quantizes W * s, calibrates its input ranges on x / s, and its lowering writes the division (folded into the
preceding norm where the graph allows). A recipe with this pass must quantize those layers' inputs
(quantize.activations static or dynamic)."""
import weakref
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from passes import activation_primitives as ap
from passes.calibration import check_calibration_samples, check_patterns, excerpt, selected_linears, \
    split_by_input_multiple
from passes.hooks import dividing_inputs, forward_pre_hooks, run_batches

# model -> (scales by layer name, the hooks dividing their inputs) until the quantize pass takes them
_SMOOTHED: "weakref.WeakKeyDictionary[nn.Module, tuple[dict[str, torch.Tensor], object]]" = \
    weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength in [0, 1]: 0 leaves the activations, 1 moves all of their range
    targets: tuple[str, ...] = ("re:.*",)  # nn.Linear names; "re:" prefix = regular expression (search)
    ignore: tuple[str, ...] = ()
    calibration_samples: int = 64
    needs_calibration = True  # the channels' maxima come from calibration data

    def __post_init__(self):
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:  # also NaN
            raise ValueError(f"smoothquant.alpha must be in [0, 1], not {excerpt(alpha)}")
        check_calibration_samples("smoothquant", self.calibration_samples)
        check_patterns("smoothquant", targets=self.targets, ignore=self.ignore)

    def label(self) -> str:
        return f"alpha {self.alpha:g}"


def smoothable(model: nn.Module, config: SmoothQuantConfig) -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """The targeted nn.Linear layers (shapes only); ValueError when none."""
    selected, ignored = selected_linears(model, config.targets, config.ignore)
    chosen, skipped = split_by_input_multiple(selected)
    return chosen, ignored + skipped


def smoothquant_model(model: nn.Module, config: SmoothQuantConfig, calibration: list[tuple] | None,
                      progress: bool = False) -> dict:
    if not calibration:
        raise ValueError("smoothquant needs calibration batches and none were given")
    chosen, skipped = smoothable(model, config)
    layers = dict(chosen)
    smooth = smooth_layers(model, layers, calibration, config.alpha)
    hooks = dividing_inputs(layers, smooth)
    hooks.__enter__()  # until take_smoothing: the model computes as before
    _SMOOTHED[model] = (smooth, hooks)
    left = [{"module": name, "reason": "its weight is shared with another module (a tied table)"}
            for name in layers if name not in smooth]
    return {"name": "smoothquant", "config": asdict(config), "label": config.label(),
            "layers": [{"module": name, "min": float(s.min()), "max": float(s.max())} for name, s in smooth.items()],
            "skipped": skipped + left}


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

    with forward_pre_hooks([(module, hook_for(name)) for name, module in layers.items()]):
        run_batches(model, [batch])
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

    with forward_pre_hooks([(module, hook_for(name, module)) for name, module in layers.items()]):
        run_batches(model, calibration)
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


def take_smoothing(model: nn.Module) -> dict[str, torch.Tensor]:
    """The scales the smoothquant pass left on `model` ({} when it did not run), their division hooks removed:
    the caller (the quantize pass) now owns the division."""
    entry = _SMOOTHED.pop(model, None)
    if entry is None:
        return {}
    smooth, hooks = entry
    hooks.__exit__(None, None, None)
    return smooth

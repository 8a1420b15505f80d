"""Structured pruning: remove whole attention heads and FFN neurons, physically shrinking the Linear layers
(and each attention module's head count), so the exported ONNX graph has smaller MatMuls.

Importance from calibration data: the energy a group of inputs contributes to its output projection,
trace(W_G H_GG W_Gᵀ) with H = Σ x xᵀ of the projection's inputs, G = one head's slice of out_proj's inputs or
one FFN neuron of fc_out's. The lowest-energy groups of each module go."""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from passes.calibration import check_calibration_samples, input_second_moments
from samples.layers import FeedForward, MultiHeadAttention


@dataclass(frozen=True)
class StructuredPruneConfig:
    heads: float = 0.25  # fraction of attention heads removed in each attention module
    ffn: float = 0.25  # fraction of FFN hidden neurons removed in each feed-forward block
    calibration_samples: int = 64

    def __post_init__(self):
        for field, value in (("heads", self.heads), ("ffn", self.ffn)):
            if not 0 <= value < 1:
                raise ValueError(f"structured_prune.{field} must be in [0, 1), not {value!r}")
        check_calibration_samples("structured_prune", self.calibration_samples)

    needs_calibration = True

    def label(self) -> str:
        return f"heads-{self.heads:.0%}-ffn-{self.ffn:.0%}"


def _group_energy(weight: torch.Tensor, moment: torch.Tensor, groups: int) -> torch.Tensor:
    """Energy of each of `groups` equal slices of the input columns: trace(W_g H_gg W_gᵀ)."""
    size = weight.shape[1] // groups
    energies = []
    for g in range(groups):
        cols = slice(g * size, (g + 1) * size)
        w = weight[:, cols].double()
        energies.append(torch.einsum("ni,ij,nj->", w, moment[cols, cols], w))
    return torch.stack(energies)


def _kept(energy: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = max(1, len(energy) - int(round(fraction * len(energy))))
    return torch.sort(torch.argsort(energy, descending=True, stable=True)[:keep]).values


def _shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    weight = linear.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    bias = None if linear.bias is None else (linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _prune_heads(attention: MultiHeadAttention, energy: torch.Tensor, fraction: float) -> tuple[int, int]:
    kept = _kept(energy, fraction)
    rows = torch.cat([torch.arange(h * attention.head_dim, (h + 1) * attention.head_dim) for h in kept.tolist()])
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attention, name, _shrink_linear(getattr(attention, name), rows=rows))
    attention.out_proj = _shrink_linear(attention.out_proj, cols=rows)
    before, attention.heads = attention.heads, len(kept)
    return before, attention.heads


def _prune_neurons(ffn: FeedForward, energy: torch.Tensor, fraction: float) -> tuple[int, int]:
    kept = _kept(energy, fraction)
    before = ffn.fc_in.out_features
    ffn.fc_in = _shrink_linear(ffn.fc_in, rows=kept)
    ffn.fc_out = _shrink_linear(ffn.fc_out, cols=kept)
    return before, len(kept)


@torch.no_grad()
def structured_prune_model(model: nn.Module, config: StructuredPruneConfig, calibration: list[tuple] | None,
                           progress: bool = False) -> dict:
    if not calibration:
        raise ValueError("structured_prune needs calibration batches and none were given")
    attentions = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    ffns = [(n, m) for n, m in model.named_modules() if isinstance(m, FeedForward)]
    projections = [m.out_proj for _, m in attentions] + [m.fc_out for _, m in ffns]
    moments = input_second_moments(model, projections, calibration)
    params_before = sum(p.numel() for p in model.parameters())
    layers = []
    for (name, attention), moment in zip(attentions, moments[: len(attentions)]):
        energy = _group_energy(attention.out_proj.weight, moment, attention.heads)
        before, after = _prune_heads(attention, energy, config.heads)
        layers.append({"module": name, "kind": "heads", "before": before, "after": after})
    for (name, ffn), moment in zip(ffns, moments[len(attentions):]):
        energy = _group_energy(ffn.fc_out.weight, moment, ffn.fc_out.in_features)
        before, after = _prune_neurons(ffn, energy, config.ffn)
        layers.append({"module": name, "kind": "ffn_neurons", "before": before, "after": after})
    params = sum(p.numel() for p in model.parameters())
    return {"name": "structured_prune", "config": asdict(config), "label": config.label(), "layers": layers,
            "skipped": [], "params_before": params_before, "params": params}

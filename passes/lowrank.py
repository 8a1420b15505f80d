"""Low-rank factorization: nn.Linear W [N, K] -> up [N, r] @ down [r, K], exported as two MatMuls (both plain
nn.Linear, so the quantize pass can quantize them too). Only where r (N + K) < N K, i.e. it really shrinks.

Rank by `rank_ratio` (r = ratio * min(N, K)), by retained `energy` of the singular values, or by
`param_budget` (the factor pair keeps that fraction of the layer's weights); rounded up to `rank_multiple`.
`activation_aware` whitens by the calibration inputs' second moment before the SVD (SVD-LLM), minimizing the
error of the layer's outputs instead of its weights."""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from passes import sparsity_primitives as sp
from passes.calibration import (check_calibration_samples, check_int, check_patterns, excerpt, input_second_moments,
                                selected_linears, split_by_input_multiple)

MAX_RANK_MULTIPLE = 1024  # the largest quantizer block size: a coarser rounding serves no block size


@dataclass(frozen=True)
class LowRankConfig:
    rank_ratio: float | None = 0.5
    energy: float | None = None
    param_budget: float | None = None
    rank_multiple: int = 32  # keeps factor widths divisible by the quantizer's block sizes
    activation_aware: bool = False
    damp: float = 1e-2
    calibration_samples: int = 64
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        chosen = [v for v in (self.rank_ratio, self.energy, self.param_budget) if v is not None]
        if len(chosen) != 1:
            raise ValueError("lowrank: set exactly one of rank_ratio, energy, param_budget (the others null)")
        if isinstance(chosen[0], bool) or not 0 < chosen[0] <= 1:
            raise ValueError(f"lowrank: rank_ratio / energy / param_budget must be in (0, 1], not {excerpt(chosen[0])}")
        check_int("lowrank.rank_multiple", self.rank_multiple, 1, MAX_RANK_MULTIPLE)
        if not isinstance(self.activation_aware, bool):
            raise ValueError(f"lowrank.activation_aware must be true or false, not {excerpt(self.activation_aware)}")
        if isinstance(self.damp, bool) or not 0 < self.damp < math.inf:  # also refuses NaN
            raise ValueError(f"lowrank.damp must be a positive number, not {excerpt(self.damp)}")
        check_calibration_samples("lowrank", self.calibration_samples)
        check_patterns("lowrank", targets=self.targets, ignore=self.ignore)

    @property
    def needs_calibration(self) -> bool:
        return self.activation_aware

    def label(self) -> str:
        how = (f"ratio{self.rank_ratio}" if self.rank_ratio is not None else
               f"energy{self.energy}" if self.energy is not None else f"budget{self.param_budget}")
        return f"lowrank-{how}" + ("-aware" if self.activation_aware else "")

    def rank(self, weight: torch.Tensor) -> int:
        rows, cols = weight.shape
        if self.rank_ratio is not None:
            rank = self.rank_ratio * min(rows, cols)
        elif self.energy is not None:
            rank = sp.energy_rank(weight, self.energy)
        else:
            rank = self.param_budget * rows * cols / (rows + cols)
        multiple = self.rank_multiple
        return max(multiple, int(-(-int(round(rank)) // multiple) * multiple))


class LowRankLinear(nn.Module):
    """x -> up(down(x)): the factorized replacement of one nn.Linear."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=bias is not None)
        self.down.weight.data.copy_(down)
        self.up.weight.data.copy_(up)
        if bias is not None:
            self.up.bias.data.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def factorizable(model: nn.Module, config: LowRankConfig) -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """The recipe's targets; ValueError when there are none. Shapes only: works on a model on the meta device."""
    selected, ignored = selected_linears(model, config.targets, config.ignore)
    return split_by_input_multiple(selected)[0], ignored


@torch.no_grad()
def lowrank_model(model: nn.Module, config: LowRankConfig, calibration: list[tuple] | None = None,
                  progress: bool = False) -> dict:
    if config.activation_aware and not calibration:
        raise ValueError("lowrank.activation_aware needs calibration batches and none were given")
    chosen, skipped = factorizable(model, config)
    moments = input_second_moments(model, [m for _, m in chosen], calibration) if config.activation_aware else None
    params_before = sum(p.numel() for p in model.parameters())
    layers = []
    for index, (name, linear) in enumerate(chosen):
        weight = linear.weight.detach().float()
        rows, cols = weight.shape
        rank = config.rank(weight)
        if rank * (rows + cols) >= rows * cols:
            skipped.append({"module": name, "reason": f"rank {rank} would not shrink a {rows}x{cols} weight"})
            continue
        if config.activation_aware:
            up, down = sp.whitened_svd_factors(weight, moments[index], rank, config.damp)
        else:
            up, down = sp.svd_factors(weight, rank)
        relative_error = float((weight - up @ down).norm() / weight.norm())
        bias = None if linear.bias is None else linear.bias.detach()
        _set_module(model, name, LowRankLinear(up, down, bias))
        layers.append({"module": name, "shape": [rows, cols], "rank": rank, "weight_relative_error": relative_error})
    params = sum(p.numel() for p in model.parameters())
    return {"name": "lowrank", "config": asdict(config), "label": config.label(), "layers": layers,
            "skipped": skipped, "params_before": params_before, "params": params}

"""Unstructured and N:M pruning of nn.Linear weights (masks applied in place: the weights become zeros).

Dense kernels (ONNX Runtime's included) do not skip zeros: this saves nothing in speed or in an fp32 file; it
is the entry point for sparsity-aware kernels and for compressing zeros later. Structured pruning, which does
shrink the graph, is passes/structured_prune.py."""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from passes import sparsity_primitives as sp
from passes.calibration import (check_calibration_samples, check_patterns, excerpt, input_second_moments,
                                selected_linears, split_by_input_multiple)


MAX_GROUP = 65_536  # the M of N:M


@dataclass(frozen=True)
class PruneConfig:
    method: str = "magnitude"  # or "wanda": |W| * ||X|| from calibration batches
    sparsity: float = 0.5  # fraction of weights removed (unstructured); N:M sets its own
    scope: str = "layer"  # rank within each layer, within each output "row", or across all layers ("global")
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4", "4:8"
    calibration_samples: int = 64
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"prune.method must be magnitude or wanda, not {excerpt(self.method)}")
        if isinstance(self.sparsity, bool) or not 0 <= self.sparsity < 1:
            raise ValueError(f"prune.sparsity must be in [0, 1), not {excerpt(self.sparsity)}")
        if self.scope not in ("layer", "row", "global"):
            raise ValueError(f"prune.scope must be layer, row or global, not {excerpt(self.scope)}")
        if self.scope == "global" and self.method == "wanda":
            raise ValueError("prune.scope=global works with method=magnitude only (Wanda scores are not "
                             "comparable across layers)")
        if self.pattern != "unstructured":
            n, m = self.n_m
            if not 0 < n < m:
                raise ValueError(f"prune.pattern {excerpt(self.pattern)}: need 0 < N < M")
            if m > MAX_GROUP:
                raise ValueError(f"prune.pattern {excerpt(self.pattern)}: M must be at most {MAX_GROUP} (a group "
                                 "runs along a layer's input width)")
        check_calibration_samples("prune", self.calibration_samples)
        check_patterns("prune", targets=self.targets, ignore=self.ignore)

    @property
    def n_m(self) -> tuple[int, int]:
        try:
            n, m = (int(v) for v in self.pattern.split(":"))
        except ValueError:
            raise ValueError(f"prune.pattern must be unstructured or N:M like 2:4, not {excerpt(self.pattern)}") \
                from None
        return n, m

    @property
    def input_multiple(self) -> int | None:
        """N:M groups run along the input dim: M must divide a layer's in_features for it to be pruned."""
        return None if self.pattern == "unstructured" else self.n_m[1]

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda"

    def label(self) -> str:
        amount = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%}"
        return f"{self.method}-{amount}" + ("" if self.scope == "layer" else f"-{self.scope}")


def prunable(model: nn.Module, config: PruneConfig) -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """The recipe's targets, less the layers whose input width M of N:M does not divide; ValueError when that
    leaves none. Shapes only: works on a model on the meta device (recipe checks before weights load)."""
    selected, ignored = selected_linears(model, config.targets, config.ignore)
    chosen, skipped = split_by_input_multiple(selected, config.input_multiple, f"the M of pattern {config.pattern}")
    return chosen, ignored + skipped


@torch.no_grad()
def prune_model(model: nn.Module, config: PruneConfig, calibration: list[tuple] | None = None,
                progress: bool = False) -> dict:
    chosen, skipped = prunable(model, config)
    if config.needs_calibration and not calibration:
        raise ValueError("prune.method=wanda needs calibration batches and none were given")
    if config.needs_calibration:
        moments = input_second_moments(model, [m for _, m in chosen], calibration)
        scores = [sp.wanda_scores(m.weight.float(), h.diagonal().float()) for (_, m), h in zip(chosen, moments)]
    else:
        scores = [m.weight.abs().float() for _, m in chosen]
    if config.pattern != "unstructured":
        masks = [sp.n_of_m_mask(score, *config.n_m) for score in scores]
    elif config.scope == "global":
        flat = sp.keep_largest(torch.cat([s.reshape(-1) for s in scores]), config.sparsity)
        masks, start = [], 0
        for score in scores:
            masks.append(flat[start : start + score.numel()].reshape(score.shape))
            start += score.numel()
    elif config.scope == "row":
        masks = [sp.keep_largest_per_row(s, config.sparsity) for s in scores]
    else:
        masks = [sp.keep_largest(s, config.sparsity) for s in scores]
    layers, pruned, total = [], 0, 0
    for (name, module), mask in zip(chosen, masks):
        module.weight.mul_(mask.to(module.weight.dtype))
        zeros = int((~mask).sum())
        pruned, total = pruned + zeros, total + mask.numel()
        layers.append({"module": name, "sparsity": zeros / mask.numel()})
    params = sum(p.numel() for p in model.parameters())
    return {"name": "prune", "config": asdict(config), "label": config.label(), "layers": layers,
            "skipped": skipped, "sparsity": pruned / max(total, 1), "params": params,
            "nonzero_params": params - pruned}

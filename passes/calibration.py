"""Statistics of the inputs that Linear layers see on calibration batches (training distribution only), and the
targets / ignore module selection every pass shares."""
import re

import torch
from torch import nn


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: list[nn.Linear], calibration: list[tuple]) -> list[torch.Tensor]:
    """For each module, H = sum over calibration tokens of x xᵀ ([K, K], float64), in one sweep of the data.
    Modules see the model as it is now (earlier layers already compressed included)."""
    moments = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in modules]

    def hook_for(index: int, module: nn.Linear):
        def hook(_, inputs, __):
            x = inputs[0].reshape(-1, module.in_features).double()
            moments[index].add_(x.T @ x)
        return hook

    handles = [m.register_forward_hook(hook_for(i, m)) for i, m in enumerate(modules)]
    try:
        for batch in calibration:
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """targets / ignore: exact module names, or regular expressions prefixed with "re:" (searched)."""
    return any(re.search(p[3:], name) if p.startswith("re:") else name == p for p in patterns)


def selected_linears(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...]):
    """(chosen [(name, nn.Linear)], skipped [{module, reason}]) for a pass's targets / ignore patterns."""
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and matches(name, targets):
            if matches(name, ignore):
                skipped.append({"module": name, "reason": "ignored by recipe"})
            else:
                chosen.append((name, module))
    return chosen, skipped

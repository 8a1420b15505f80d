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


def check_patterns(pass_name: str, **fields: tuple[str, ...]) -> None:
    """A config's module patterns (targets, ignore, ...): "re:" patterns must compile (a recipe error, not a crash
    mid-run)."""
    for field, patterns in fields.items():
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"{pass_name}.{field}: {pattern!r} is not a valid regular expression "
                                     f"({exc})") from None


def check_calibration_samples(pass_name: str, samples: int) -> None:
    if samples < 1:
        raise ValueError(f"{pass_name}.calibration_samples must be at least 1, not {samples!r}")


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


def split_by_input_multiple(selected: list[tuple[str, nn.Linear]], multiple: int | None = None,
                            what: str = "") -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """(fit, skipped): the selected layers whose in_features `multiple` divides (all when it is None). Passes skip
    and report the others; targets that select no layer, or a `what` that fits none, is a ValueError."""
    if not selected:
        raise ValueError("its targets / ignore select no nn.Linear layer")
    if multiple is None:
        return list(selected), []
    fit = [(name, module) for name, module in selected if module.in_features % multiple == 0]
    skipped = [{"module": name, "reason": f"in_features {module.in_features} not divisible by {what}"}
               for name, module in selected if module.in_features % multiple]
    if not fit:
        widths = ", ".join(str(w) for w in sorted({m.in_features for _, m in selected}))
        raise ValueError(f"{what} divides the in_features of none of the {len(selected)} selected nn.Linear "
                         f"layers (in_features {widths})")
    return fit, skipped

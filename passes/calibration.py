"""Statistics of the inputs that Linear layers see on calibration batches (training distribution only), the
targets / ignore module selection every pass shares, and how messages quote a user's value or an exception."""
import re
import reprlib

import torch
from torch import nn

# Upper bounds of config counts, so that a typo (10**12 samples, 10**9 steps) is a recipe error before any model
# loads rather than a 7 TiB allocation or a week of compute. Each is far beyond what the passes need.
MAX_CALIBRATION_SAMPLES = 100_000  # windows drawn up front: 100k x 256 int64 tokens = 200 MB for HF LMs


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: list[nn.Linear], calibration: list[tuple],
                         diagonal: bool = False) -> list[torch.Tensor]:
    """For each module, H = sum over calibration tokens of x xᵀ ([K, K], float64), in one sweep of the data;
    `diagonal`: only H's diagonal, each input channel's sum of x² ([K]: what schemes that weigh input channels read,
    without a K x K product per token). Modules see the model as it is now (earlier layers already compressed
    included)."""
    moments = [torch.zeros(m.in_features, dtype=torch.float64) if diagonal else
               torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in modules]

    def hook_for(index: int, module: nn.Linear):
        def hook(_, inputs, __):
            x = inputs[0].reshape(-1, module.in_features).double()
            moments[index].add_((x * x).sum(dim=0) if diagonal else x.T @ x)
        return hook

    handles = [m.register_forward_hook(hook_for(i, m)) for i, m in enumerate(modules)]
    try:
        for batch in calibration:
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments


class _Excerpt(reprlib.Repr):
    """repr() with bounded work and output: long strings, containers and deep nesting are elided, and integers
    too long for repr() (over 4300 digits raise ValueError) are described instead of printed."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxstring = self.maxother = max(limit, 12)
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset, self.maxfrozenset = 3, 4, 6, 6, 6, 6

    def repr_int(self, x, level):
        if x.bit_length() > 200:
            return f"<an integer of {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


def excerpt(value, limit: int = 60) -> str:
    """A user value as error messages quote it: repr-like, on one line, at most about `limit` characters (a
    message must stay one short line whatever the user gave: a 1 MB string, a huge integer, a deep mapping)."""
    try:
        text = _Excerpt(limit).repr(value)
    except Exception:  # noqa: BLE001  (a message must never fail to format)
        text = f"<{type(value).__name__}>"
    text = " ".join(text.splitlines())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, str) and len(value) > limit:
        text += f" ({len(value):,} characters)"
    return text


def first_line(exc: BaseException, limit: int | None = 160) -> str:
    """An exception's message as a one-line error quotes it: its first line, cut to `limit` characters (None: uncut)
    (parsers' and exporters' messages run to pages; the first line names the problem), or its type where it has
    none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def check_int(name: str, value, low: int, high: int) -> None:
    """An int config field in [low, high] (bool refused: true is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {excerpt(value)}")
    if value < low:
        raise ValueError(f"{name} must be at least {low:,}, not {excerpt(value)}")
    if value > high:
        raise ValueError(f"{name} must be at most {high:,}, not {excerpt(value)}")


def check_patterns(pass_name: str, **fields: tuple[str, ...]) -> None:
    """A config's module patterns (targets, ignore, ...): "re:" patterns must compile (a recipe error, not a crash
    mid-run)."""
    for field, patterns in fields.items():
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"{pass_name}.{field}: {excerpt(pattern)} is not a module name or re: pattern")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except (re.error, RecursionError, OverflowError, ValueError, MemoryError) as exc:
                    # RecursionError: thousands of nested groups; OverflowError: a{99999999999}
                    reason = " ".join(str(exc).split())[:100] or type(exc).__name__
                    raise ValueError(f"{pass_name}.{field}: {excerpt(pattern)} is not a valid regular expression "
                                     f"({reason})") from None


def check_calibration_samples(pass_name: str, samples: int) -> None:
    check_int(f"{pass_name}.calibration_samples", samples, 1, MAX_CALIBRATION_SAMPLES)


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

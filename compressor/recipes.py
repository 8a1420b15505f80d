"""Recipes: which passes run, in which order, with which configs. Built-in presets plus `--set pass.key=value`
overrides; every config is validated (dataclass __post_init__) before a model is loaded."""
import dataclasses
import difflib
from dataclasses import dataclass

import yaml

from compressor.errors import UserError
from passes.heal import HealConfig
from passes.lowrank import LowRankConfig
from passes.prune import PruneConfig
from passes.quantize import QuantizeConfig
from passes.structured_prune import StructuredPruneConfig

PASS_CONFIGS = {"prune": PruneConfig, "structured_prune": StructuredPruneConfig, "lowrank": LowRankConfig,
                "heal": HealConfig, "quantize": QuantizeConfig}
# prune -> low-rank -> quantize; heal may follow pruning or low-rank, never quantization
STAGES = {"prune": 0, "structured_prune": 0, "lowrank": 1, "heal": 1, "quantize": 2}

PRESETS: dict[str, dict[str, dict]] = {
    "fp32": {},
    "int8": {"quantize": {"dtype": "int", "bits": 8, "block_size": 0, "full_range": True}},
    "int4": {"quantize": {"dtype": "int", "bits": 4, "block_size": 64, "full_range": True}},
    "int4-gptq": {"quantize": {"dtype": "int", "bits": 4, "block_size": 64, "full_range": True, "method": "gptq"}},
    "int3-gptq": {"quantize": {"dtype": "int", "bits": 3, "block_size": 64, "full_range": True, "method": "gptq"}},
    "nf4": {"quantize": {"dtype": "nf", "bits": 4, "block_size": 64}},
    "float4": {"quantize": {"dtype": "float", "bits": 4, "block_size": 64}},
    "log4": {"quantize": {"dtype": "log2", "bits": 4, "block_size": 64}},
    "quantile4": {"quantize": {"dtype": "quantile", "bits": 4, "block_size": 64}},
    "kmeans4": {"quantize": {"dtype": "kmeans", "bits": 4, "block_size": 64, "activation_weighted": True}},
    "prune50": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "prune24": {"prune": {"method": "wanda", "pattern": "2:4"}},
    "prune50-int4": {"prune": {"method": "wanda", "sparsity": 0.5},
                     "quantize": {"dtype": "int", "bits": 4, "block_size": 64, "full_range": True}},
    "structured25": {"structured_prune": {"heads": 0.25, "ffn": 0.25}},
    "lowrank": {"lowrank": {"rank_ratio": None, "param_budget": 0.6, "activation_aware": True}},
    "lowrank-int4": {"lowrank": {"rank_ratio": None, "param_budget": 0.6, "activation_aware": True},
                     "quantize": {"dtype": "int", "bits": 4, "block_size": 32, "full_range": True}},
    "chain-int4": {"structured_prune": {"heads": 0.25, "ffn": 0.25},
                   "lowrank": {"rank_ratio": None, "param_budget": 0.8, "activation_aware": True},
                   "heal": {"steps": 100},
                   "quantize": {"dtype": "int", "bits": 4, "block_size": 32, "full_range": True}},
}


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[tuple[str, object], ...]  # (pass name, frozen config)

    def to_dict(self) -> dict:
        return {"name": self.name,
                "passes": [{"name": n, "config": dataclasses.asdict(c)} for n, c in self.passes]}


class _Raw(str):
    """An override's value as typed on the command line, read according to the field it sets."""


def _parse_override(text: str) -> tuple[str, str, _Raw]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected PASS.KEY=VALUE, e.g. quantize.bits=3")
    target, raw = text.split("=", 1)
    pass_name, key = target.split(".", 1)
    return pass_name, key, _Raw(raw)


def _coerce(pass_name: str, field: dataclasses.Field, value):
    """Raw override text -> the field's type (YAML would read 2:4 as the base-60 number 124); then a type check
    so that `bits=four` or `symmetric=maybe` fail here with the field's name."""
    kind = field.type
    if isinstance(value, _Raw):
        if kind is str:
            return str(value)
        if kind == tuple[str, ...]:
            return tuple(v.strip() for v in value.split(",") if v.strip())
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"{pass_name}.{field.name}: cannot read {str(value)!r}") from None
    if isinstance(value, list):
        value = tuple(value)
    allowed = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(kind)
    if kind == float | None:
        allowed = (int, float, type(None))
    elif kind == int | None:
        allowed = (int, type(None))
    if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        raise UserError(f"{pass_name}.{field.name} must be {getattr(kind, '__name__', kind)}, not {value!r}")
    return value


def _build(pass_name: str, fields: dict):
    config_type = PASS_CONFIGS[pass_name]
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
        raise UserError(f"{pass_name}: unknown key {unknown[0]!r}{hint}")
    values = {key: _coerce(pass_name, known[key], value) for key, value in fields.items()}
    try:
        return config_type(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{pass_name}: {exc}") from None


def resolve_recipe(name: str, overrides: tuple[str, ...] = ()) -> Recipe:
    if name not in PRESETS:
        raise UserError(f"unknown recipe {name!r} (presets: {', '.join(PRESETS)})")
    passes = {pass_name: dict(fields) for pass_name, fields in PRESETS[name].items()}
    for text in overrides:
        pass_name, key, value = _parse_override(text)
        if pass_name not in PASS_CONFIGS:
            close = difflib.get_close_matches(pass_name, PASS_CONFIGS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"passes: {', '.join(PASS_CONFIGS)}"
            raise UserError(f"--set {text!r}: unknown pass {pass_name!r} ({hint})")
        passes.setdefault(pass_name, {})[key] = value
    order = sorted(passes, key=lambda p: STAGES[p])  # a pass added by --set takes its stage's place
    built = tuple((pass_name, _build(pass_name, passes[pass_name])) for pass_name in order)
    label = name if not overrides else f"{name} + {' '.join(overrides)}"
    return Recipe(label, built)

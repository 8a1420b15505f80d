"""Recipes: which passes run, in which order, with which configs. Built-in presets plus `--set pass.key=value`
overrides; every config is validated (dataclass __post_init__) before a model is loaded."""
import dataclasses
from dataclasses import dataclass

import yaml

from compressor.errors import UserError
from passes.quantize import QuantizeConfig

PASS_CONFIGS = {"quantize": QuantizeConfig}

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
}


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[tuple[str, object], ...]  # (pass name, frozen config)

    def to_dict(self) -> dict:
        return {"name": self.name,
                "passes": [{"name": n, "config": dataclasses.asdict(c)} for n, c in self.passes]}


def _parse_override(text: str) -> tuple[str, str, object]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected PASS.KEY=VALUE, e.g. quantize.bits=3")
    target, raw = text.split("=", 1)
    pass_name, key = target.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return pass_name, key, value


def _build(pass_name: str, fields: dict):
    config_type = PASS_CONFIGS[pass_name]
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise UserError(f"{pass_name}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    for key, value in fields.items():
        if isinstance(value, list) or (key in ("targets", "ignore") and isinstance(value, str)):
            fields[key] = tuple(value) if isinstance(value, list) else tuple(v for v in value.split(",") if v)
    try:
        return config_type(**fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{pass_name}: {exc}") from None


def resolve_recipe(name: str, overrides: tuple[str, ...] = ()) -> Recipe:
    if name not in PRESETS:
        raise UserError(f"unknown recipe {name!r} (presets: {', '.join(PRESETS)})")
    passes = {pass_name: dict(fields) for pass_name, fields in PRESETS[name].items()}
    for text in overrides:
        pass_name, key, value = _parse_override(text)
        if pass_name not in PASS_CONFIGS:
            raise UserError(f"--set {text!r}: unknown pass {pass_name!r} (passes: {', '.join(PASS_CONFIGS)})")
        passes.setdefault(pass_name, {})[key] = value
    built = tuple((pass_name, _build(pass_name, fields)) for pass_name, fields in passes.items())
    label = name if not overrides else f"{name} + {' '.join(overrides)}"
    return Recipe(label, built)

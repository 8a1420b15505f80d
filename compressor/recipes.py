"""Recipes: which passes run, in which order, with which configs, and which gates the result must pass.
Built-in presets or a YAML file, plus `--set pass.key=value` overrides; everything is validated (unknown
passes and keys with a did-you-mean, types, ranges, stage order) before a model is loaded."""
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn

from compressor.errors import UserError
from passes.registry import PASSES, STAGE_ORDER

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
    # llama.cpp's Q4_1 (w = d * q + m per 32; d and m in fp32 so that ORT keeps MatMulNBits) and an 8-bit lm_head,
    # as Q4_1 GGUFs keep their output layer (Q8_0); per-channel, as ORT's CUDA EP has no blocked int8 kernel
    "q4_1": {"quantize": {"dtype": "int", "bits": 4, "block_size": 32, "symmetric": False, "zero_point": "float",
                          "overrides": {"re:lm_head": {"bits": 8, "block_size": 0, "symmetric": True,
                                                        "zero_point": "int"}}}},
    "int4-fused": {"quantize": {"dtype": "int", "bits": 4, "block_size": 64, "full_range": True}, "fuse": {}},
    "chain-int4": {"structured_prune": {"heads": 0.25, "ffn": 0.25},
                   "lowrank": {"rank_ratio": None, "param_budget": 0.8, "activation_aware": True},
                   "heal": {"steps": 100},
                   "quantize": {"dtype": "int", "bits": 4, "block_size": 32, "full_range": True}},
}


@dataclass(frozen=True)
class Gates:
    """Regression gates: a run that misses one exits 1 (its report still written)."""
    min_recovery: float | None = None  # accuracy kept: compressed/reference (perplexity: reference/compressed)
    min_speedup: float | None = None  # fp32 CPU p50 latency / artifact's, at batch 1 and 16
    require_parity: bool = True  # logits and accuracy agree with the torch model at the stated tolerances

    def __post_init__(self):
        if not isinstance(self.require_parity, bool):
            raise ValueError(f"gates.require_parity must be true or false, not {self.require_parity!r}")
        for name in ("min_recovery", "min_speedup"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):  # also refuses NaN
                raise ValueError(f"gates.{name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[tuple[str, object], ...]  # (pass name, frozen config)
    gates: Gates = field(default_factory=Gates)

    def to_dict(self) -> dict:
        return {"name": self.name,
                "passes": [{"name": n, "config": dataclasses.asdict(c)} for n, c in self.passes],
                "gates": dataclasses.asdict(self.gates)}

    def to_yaml(self) -> str:
        """The resolved recipe in the file format `--recipe FILE` reads back."""
        body = {"passes": [{n: _plain(dataclasses.asdict(c))} for n, c in self.passes],
                "gates": dataclasses.asdict(self.gates)}
        return f"# resolved from: {self.name}\n" + yaml.safe_dump(body, sort_keys=False)


def _plain(fields: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


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
    if kind == tuple[str, ...]:  # from a YAML file: one string or a list of strings
        value = (value,) if isinstance(value, str) else value
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{pass_name}.{field.name} must be a list of module names / re: patterns, not {value!r}")
    allowed = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(kind)
    if kind == float | None:
        allowed = (int, float, type(None))
    elif kind == int | None:
        allowed = (int, type(None))
    if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        raise UserError(f"{pass_name}.{field.name} must be {getattr(kind, '__name__', kind)}, not {value!r}")
    return value


def _build(pass_name: str, fields: dict):
    config_type = PASSES[pass_name].config
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise UserError(f"{pass_name}: unknown key {unknown[0]!r} ({_did_you_mean(str(unknown[0]), known)})")
    values = {key: _coerce(pass_name, known[key], value) for key, value in fields.items()}
    try:
        return config_type(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{pass_name}: {exc}") from None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(choices)}"


def load_recipe_file(path: Path) -> tuple[dict[str, dict], dict]:
    """A YAML recipe: `passes:` a list of one-key mappings {pass: {field: value}} in stage order, and optional
    `gates:`. Returns (passes in file order, gates)."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise UserError(f"recipe {path}: expected a mapping with 'passes' (and optionally 'gates')")
    for key in document:
        if key not in ("passes", "gates"):
            raise UserError(f"recipe {path}: unknown key {key!r} ({_did_you_mean(str(key), ['passes', 'gates'])})")
    entries = document.get("passes") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and len(e) == 1 for e in entries):
        raise UserError(f"recipe {path}: 'passes' must be a list of one-key mappings, e.g. - quantize: {{bits: 4}}")
    passes: dict[str, dict] = {}
    for entry in entries:
        (pass_name, fields), = entry.items()
        if pass_name not in PASSES:
            raise UserError(f"recipe {path}: unknown pass {pass_name!r} ({_did_you_mean(str(pass_name), PASSES)})")
        if pass_name in passes:
            raise UserError(f"recipe {path}: pass {pass_name!r} is listed twice")
        if fields is not None and not isinstance(fields, dict):
            raise UserError(f"recipe {path}: the fields of {pass_name!r} must be a mapping")
        if passes and PASSES[pass_name].stage < max(PASSES[p].stage for p in passes):
            raise UserError(f"recipe {path}: {pass_name!r} comes after {list(passes)[-1]!r}; the stage order is "
                            f"{STAGE_ORDER}")
        passes[pass_name] = dict(fields or {})
    gates = document.get("gates") or {}
    if not isinstance(gates, dict):
        raise UserError(f"recipe {path}: 'gates' must be a mapping")
    return passes, gates


def _build_gates(fields: dict) -> Gates:
    known = {f.name for f in dataclasses.fields(Gates)}
    for key in fields:
        if key not in known:
            raise UserError(f"gates: unknown key {key!r} ({_did_you_mean(str(key), known)})")
    try:
        return Gates(**fields)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def resolve_recipe(name: str, overrides: tuple[str, ...] = ()) -> Recipe:
    """A preset name or a YAML file path, then the --set overrides (gates.KEY=VALUE included)."""
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        file_passes, gate_fields = load_recipe_file(Path(name))
        passes = file_passes
    elif name in PRESETS:
        passes = {pass_name: dict(fields) for pass_name, fields in PRESETS[name].items()}
        gate_fields = {}
    else:
        raise UserError(f"unknown recipe {name!r} (presets: {', '.join(PRESETS)}; or a .yaml file)")
    for text in overrides:
        pass_name, key, value = _parse_override(text)
        if pass_name == "gates":
            try:
                gate_fields[key] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                raise UserError(f"--set {text!r}: cannot read {str(value)!r}") from None
            continue
        if pass_name not in PASSES:
            raise UserError(f"--set {text!r}: unknown pass {pass_name!r} ({_did_you_mean(pass_name, PASSES)})")
        passes.setdefault(pass_name, {})[key] = value
    order = sorted(passes, key=lambda p: PASSES[p].stage)  # a pass added by --set takes its stage's place
    built = tuple((pass_name, _build(pass_name, passes[pass_name])) for pass_name in order)
    label = name if not overrides else f"{name} + {' '.join(overrides)}"
    return Recipe(label, built, _build_gates(gate_fields))


def check_recipe_fits(recipe: Recipe, model: nn.Module) -> None:
    """The recipe against the model's layer shapes (a model on the meta device will do: no weights are read):
    each pass that selects nn.Linear layers selects at least one, and its block size or N:M group divides the
    input width of at least one (the passes skip, and report, the layers it does not divide)."""
    for pass_name, config in recipe.passes:
        spec = PASSES[pass_name]
        if spec.select is not None:
            try:
                spec.select(model, config)
            except ValueError as exc:
                raise UserError(f"recipe {recipe.name!r} does not fit the model: {pass_name}: {exc}") from None
        if spec.reshapes:
            return

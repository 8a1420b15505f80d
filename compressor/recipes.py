"""Recipes: which passes run, in which order, with which configs, and which gates the result must pass.
Built-in presets or a YAML file, plus `--set pass.key=value` overrides; everything is validated (unknown
passes and keys with a did-you-mean, types, ranges, stage order) before a model is loaded."""
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn


from compressor.errors import UserError
from compressor.regex_safety import regex_backtracking_problem
from passes.calibration import excerpt as _excerpt
from passes.calibration import first_line
from passes.model_bits import UNQUANTIZED_BITS
from passes.quantize.config import NOT_OVERRIDABLE, QuantizeConfig
from passes.registry import PASSES, STAGE_ORDER

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a larger file is not one
MAX_YAML_DEPTH = 16  # a recipe nests 6 levels (passes > pass > quantize > overrides > pattern > field)

PRESETS: dict[str, dict[str, dict]] = {
    "fp32": {},
    "int8": {"quantize": {"dtype": "int", "bits": 8, "block_size": 0, "full_range": True, "embedding_bits": 8}},
    # int4 (issue 29, docs/int4-vs-model-builder.md): blocks of 32 (what llama.cpp's and Model Builder's 4-bit
    # blocks are: a GGUF input's own blocks), each block's scale searched for the least squared error (data-free,
    # so ONNX inputs and streamed heads take it too), and a table tied to the head stored once (the lookup reads
    # the head's codes). Before: B64 absmax, the tied table twice (SmolLM2-135M: 93.93 MB, perplexity 38.60 on 16
    # held-out windows; now 86.41 MB, 33.23; Model Builder's int4 86.51 MB, 33.41)
    "int4": {"quantize": {"dtype": "int", "bits": 4, "block_size": 32, "full_range": True, "scale_search": "mse",
                          "tied_table": "shared", "embedding_bits": 4, "embedding_block_size": 32}},
    # W8A8: int8 weights per channel and int8 activations, so that ONNX Runtime runs integer GEMMs
    # (MatMulIntegerToFloat / DynamicQuantizeMatMul); static ranges from calibration data, or dynamic per call.
    # The weights use 7 of their 8 bits (ORT's reduce_range): u8 x s8 GEMMs are then exact on every x86 CPU
    # (AVX2 without VNNI saturates full-range products) and fast (VNNI; the U8U8 kernel is 2x slower there)
    "w8a8": {"quantize": {"dtype": "int", "bits": 7, "block_size": 0, "activations": "static",
                          "integer_weights": "int8", "embedding_bits": 8}},
    "w8a8-dynamic": {"quantize": {"dtype": "int", "bits": 7, "block_size": 0, "activations": "dynamic",
                                  "integer_weights": "int8", "embedding_bits": 8}},
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
    # llama.cpp's Q4_1 (w = d * q + m per 32; d and m in fp32 so that ORT keeps MatMulNBits) and the lm_head as
    # Q4_1 GGUFs keep their output layer, Q8_0 (symmetric int8 per 32): a Q4_1 GGUF's weights come back exactly
    # (SmolLM2: torch perplexity unchanged; a per-channel head cost +0.09%). ORT CPU re-blocks per-channel int8 to
    # blocks of 32 anyway, so the blocks cost no speed there; ORT's CUDA EP has no blocked int8 kernel (use --set
    # "quantize.overrides={'re:lm_head': {bits: 8, block_size: 0, symmetric: true, zero_point: int}}" there)
    "q4_1": {"quantize": {"dtype": "int", "bits": 4, "block_size": 32, "symmetric": False, "zero_point": "float",
                          "overrides": {"re:lm_head": {"bits": 8, "block_size": 32, "symmetric": True,
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
            raise ValueError(f"gates.require_parity must be true or false, not {_excerpt(self.require_parity)}")
        for name in ("min_recovery", "min_speedup"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf or not _fits_a_float(value)):  # also refuses NaN
                raise ValueError(f"gates.{name} must be a positive number, not {_excerpt(value)}")


def _fits_a_float(value) -> bool:
    """An int a float can hold (10**400 cannot: float() and JSON reports would fail on it later)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


EXPORT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Export:
    """How the artifact stores what is not k-bit: float32, or float16 for the CUDA execution provider (whose
    MatMulNBits and GroupQueryAttention kernels are float16; see exporters/float16.py)."""
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"export.dtype must be one of {', '.join(EXPORT_DTYPES)}, not {_excerpt(self.dtype)}")

    @property
    def float_bits(self) -> int:
        """The width of every float tensor the artifact stores (total model bits count them at it)."""
        return 16 if self.dtype == "float16" else UNQUANTIZED_BITS


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[tuple[str, object], ...]  # (pass name, frozen config)
    gates: Gates = field(default_factory=Gates)
    export: Export = field(default_factory=Export)
    notes: tuple[str, ...] = ()  # one line each, printed by the run: e.g. a field read from where it used to be

    def __post_init__(self):
        names = [name for name, _ in self.passes]
        quantize = next((config for name, config in self.passes if name == "quantize"), None)
        if "smoothquant" in names and (quantize is None or quantize.activations == "none"):
            raise UserError("smoothquant needs quantize.activations static or dynamic: smoothing only pays when the "
                            "activations are quantized")

    def to_dict(self) -> dict:
        return {"name": self.name,
                "passes": [{"name": n, "config": dataclasses.asdict(c)} for n, c in self.passes],
                "gates": dataclasses.asdict(self.gates), "export": dataclasses.asdict(self.export)}

    def to_yaml(self) -> str:
        """The resolved recipe in the file format `--recipe FILE` reads back."""
        body = {"passes": [{n: _plain(dataclasses.asdict(c))} for n, c in self.passes],
                "gates": dataclasses.asdict(self.gates), "export": dataclasses.asdict(self.export)}
        return f"# resolved from: {self.name}\n" + yaml.safe_dump(body, sort_keys=False)


def _plain(fields: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


class _Raw(str):
    """An override's value as typed on the command line, read according to the field it sets."""


def _where(path) -> str:
    """A path as messages print it: as is when short and printable, else a bounded excerpt."""
    text = str(path)
    return text if len(text) <= 160 and text.isprintable() else _excerpt(text, 160)


def _read_yaml(text: str, what: str, invalid: str | None = None):
    """yaml.safe_load, minus what makes YAML hostile: aliases and anchors (a 500-byte "billion laughs" file
    expands to gigabytes; recipes never need them) and deep nesting (the composer recurses), both refused by
    scanning the parser's events before anything is built. `what` starts the messages; `invalid`, if given, is
    the message for text that is not YAML."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise UserError(f"{what}: YAML anchors and aliases (&name, *name) are not allowed in recipes")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise UserError(f"{what}: nested deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(invalid or f"{what} is not valid YAML ({_yaml_problem(exc)})") from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        # e.g. an integer of over 4300 digits: int() refuses to read it
        raise UserError(f"{what}: cannot read a value ({type(exc).__name__}: {_one_line(exc, 100)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong, and where, on one short line (its own message spans several and quotes the text)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return _one_line(first_line(exc), 120)
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return _one_line(f"{context}, {problem}" if context else problem, 160) + where


def _parse_override(text: str) -> tuple[str, str, _Raw]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {_excerpt(text)}: expected PASS.KEY=VALUE, e.g. quantize.bits=3")
    target, raw = text.split("=", 1)
    pass_name, key = target.split(".", 1)
    return pass_name, key, _Raw(raw)


def _read_override(label: str, value: _Raw):
    """The YAML value of a --set VALUE (empty: null)."""
    if not value.strip():
        return None
    return _read_yaml(str(value), label, invalid=f"{label}: cannot read {_excerpt(str(value))}")


def _coerce(label: str, field: dataclasses.Field, value):
    """Raw override text -> the field's type (YAML would read 2:4 as the base-60 number 124); then a type check
    so that `bits=four` or `symmetric=maybe` fail here with the field's name (`label`, e.g. quantize.bits)."""
    kind = field.type
    if isinstance(value, _Raw):
        if kind is str:
            return str(value)
        if kind == tuple[str, ...]:
            return tuple(v.strip() for v in value.split(",") if v.strip())
        value = _read_override(label, value)
    if isinstance(value, list):
        value = tuple(value)
    if kind == tuple[str, ...]:  # from a YAML file: one string or a list of strings
        value = (value,) if isinstance(value, str) else value
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{label} must be a list of module names / re: patterns, not {_excerpt(value)}")
    allowed = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(kind)
    if kind == float | None:
        allowed = (int, float, type(None))
    elif kind == int | None:
        allowed = (int, type(None))
    if allowed and float in allowed:
        value = _exponent_float(value)
    if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        raise UserError(f"{label} must be {getattr(kind, '__name__', kind)}, not {_excerpt(value)}")
    if allowed and float in allowed and isinstance(value, int) and not _fits_a_float(value):
        raise UserError(f"{label} must be a number a float can hold, not {_excerpt(value)}")
    return value


# a number as YAML 1.2 and JSON write it: PyYAML reads YAML 1.1, whose floats need a dot, so 1e-3 (and 5E-5) come
# back as text, while 1.0e-3 is a float
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _exponent_float(value):
    """For a float field: text that is a number in exponent notation (1e-3), as that number."""
    if isinstance(value, str) and len(value) <= 100 and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _coerce_overrides(pass_name: str, known: dict[str, dataclasses.Field], overrides):
    """Per-layer overrides ({pattern: {field: value}}) get the type checks of the fields they set. Whatever is not
    of that shape (or names a field that cannot be overridden) is left to the config's own checks to refuse."""
    if not isinstance(overrides, dict):
        return overrides
    checked = {}
    for pattern, fields in overrides.items():
        if isinstance(fields, dict):
            fields = {key: _coerce(f"{pass_name}.overrides[{_excerpt(pattern)}].{key}", known[key], value)
                      if isinstance(key, str) and key in known and key not in NOT_OVERRIDABLE else value
                      for key, value in fields.items()}
        checked[pattern] = fields
    return checked


def _check_backtracking(pass_name: str, config) -> None:
    """Every re: pattern of a built config (targets, ignore, the keys of overrides) against
    regex_backtracking_problem."""
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        patterns = list(value) if isinstance(value, (tuple, dict)) else []
        for pattern in patterns:
            if isinstance(pattern, str) and pattern.startswith("re:"):
                problem = regex_backtracking_problem(pattern[3:])
                if problem:
                    raise UserError(f"{pass_name}.{config_field.name}: {_excerpt(pattern)} {problem}")


# fields that moved to a pass of their own: (pass, field) -> (pass, field). A recipe that sets one at its old place
# is read as if it set the new one (with a note saying so); the new pass takes the old pass's layer selection.
MOVED_FIELDS = {("quantize", "smoothquant_alpha"): ("smoothquant", "alpha")}
SELECTION_FIELDS = ("targets", "ignore", "calibration_samples")


def _move_fields(passes: dict[str, dict]) -> tuple[str, ...]:
    notes = []
    for (old_pass, old_key), (new_pass, new_key) in MOVED_FIELDS.items():
        fields = passes.get(old_pass, {})
        if old_key not in fields:
            continue
        value = fields.pop(old_key)
        notes.append(f"recipe: {old_pass}.{old_key} has moved; read as {new_pass}.{new_key} (write "
                     f"`{new_pass}: {{{new_key}: ...}}` in the recipe)")
        if value is None or (isinstance(value, str) and value.strip() in ("", "null", "~")):
            continue  # off: no pass
        moved = passes.setdefault(new_pass, {})
        moved.setdefault(new_key, value)
        for key in SELECTION_FIELDS:
            if key in fields:
                moved.setdefault(key, fields[key])
    return tuple(notes)


def _build(pass_name: str, fields: dict):
    config_type = PASSES[pass_name].config
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted((key for key in fields if key not in known), key=_excerpt)  # keys of any type: 1, null, zz
    if unknown:
        raise UserError(f"{pass_name}: unknown key {_excerpt(unknown[0])} ({_did_you_mean(unknown[0], known)})")
    values = {key: _coerce(f"{pass_name}.{key}", known[key], value) for key, value in fields.items()}
    if "overrides" in values:
        values["overrides"] = _coerce_overrides(pass_name, known, values["overrides"])
    try:
        config = config_type(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{pass_name}: {_one_line(exc)}") from None
    _check_backtracking(pass_name, config)
    return config


def _one_line(message, limit: int = 300) -> str:
    """An exception's message (or any text) on one line of at most `limit` characters."""
    text = " ".join(str(message).split()) or type(message).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


KNOWN_LISTED = 240  # characters of the known names an error lists, so that the message stays one short line


def _did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1) if isinstance(word, str) and len(word) <= 100 else []
    if close:
        return f"did you mean {close[0]!r}?"
    listed = ", ".join(choices)
    if len(listed) > KNOWN_LISTED:  # e.g. quantize's 28 fields: the rest are in `compress passes`
        listed = listed[:listed.rfind(", ", 0, KNOWN_LISTED)] + ", ... (all: compress passes)"
    return f"known: {listed}"


def load_recipe_file(path: Path) -> tuple[dict[str, dict], dict, dict]:
    """A YAML recipe: `passes:` a list of one-key mappings {pass: {field: value}} in stage order, and optional
    `gates:` and `export:`. Returns (passes in file order, gates, export)."""
    where = _where(path)
    try:
        path = Path(path)
        if not path.is_file():  # a folder, a FIFO (reading it would wait forever), a device
            reason = "not a file" if path.exists() else "No such file or directory"
            raise UserError(f"cannot read recipe {where}: {reason}")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"recipe {where} is {path.stat().st_size:,} bytes: not a recipe (at most "
                            f"{MAX_RECIPE_BYTES:,})")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read recipe {where}: {exc.strerror or _one_line(exc)}") from None
    except ValueError as exc:  # UnicodeDecodeError; a NUL in the path
        raise UserError(f"cannot read recipe {where}: {_one_line(exc, 120)}") from None
    document = _read_yaml(text, f"recipe {where}")
    if not isinstance(document, dict):
        raise UserError(f"recipe {where}: expected a mapping with 'passes' (and optionally 'gates', 'export')")
    for key in document:
        if key not in SECTIONS:
            raise UserError(f"recipe {where}: unknown key {_excerpt(key)} ({_did_you_mean(key, SECTIONS)})")
    entries = document.get("passes")
    entries = [] if entries is None else entries
    if not isinstance(entries, list) or not all(isinstance(e, dict) and len(e) == 1 for e in entries):
        raise UserError(f"recipe {where}: 'passes' must be a list of one-key mappings, e.g. - quantize: {{bits: 4}}")
    passes: dict[str, dict] = {}
    for entry in entries:
        (pass_name, fields), = entry.items()
        if pass_name not in PASSES:
            raise UserError(f"recipe {where}: unknown pass {_excerpt(pass_name)} ({_did_you_mean(pass_name, PASSES)})")
        if pass_name in passes:
            raise UserError(f"recipe {where}: pass {pass_name!r} is listed twice")
        if fields is not None and not isinstance(fields, dict):
            raise UserError(f"recipe {where}: the fields of {pass_name!r} must be a mapping")
        if passes and PASSES[pass_name].stage < max(PASSES[p].stage for p in passes):
            raise UserError(f"recipe {where}: {pass_name!r} comes after {list(passes)[-1]!r}; the stage order is "
                            f"{STAGE_ORDER}")
        passes[pass_name] = dict(fields or {})
    sections = []
    for section in ("gates", "export"):
        fields = document.get(section)
        fields = {} if fields is None else fields
        if not isinstance(fields, dict):
            raise UserError(f"recipe {where}: '{section}' must be a mapping")
        sections.append(fields)
    return passes, *sections


SECTIONS = ("passes", "gates", "export")


def _build_section(kind: type, section: str, fields: dict):
    known = {f.name: f.type for f in dataclasses.fields(kind)}
    for key in fields:
        if key not in known:
            raise UserError(f"{section}: unknown key {_excerpt(key)} ({_did_you_mean(key, known)})")
    fields = {key: _exponent_float(value) if known[key] in (float, float | None) else value
              for key, value in fields.items()}
    try:
        return kind(**fields)
    except (TypeError, ValueError) as exc:
        raise UserError(_one_line(exc)) from None


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name too long for the file system; a NUL byte
        return False


def resolve_recipe(name: str, overrides: tuple[str, ...] = ()) -> Recipe:
    """A preset name or a YAML file path, then the --set overrides (gates.KEY=VALUE and export.KEY=VALUE
    included)."""
    if name.endswith((".yaml", ".yml")) or _is_file(name):
        passes, gate_fields, export_fields = load_recipe_file(Path(name))
    elif name in PRESETS:
        passes = {pass_name: dict(fields) for pass_name, fields in PRESETS[name].items()}
        gate_fields, export_fields = {}, {}
    else:
        raise UserError(f"unknown recipe {_excerpt(name)} (presets: {', '.join(PRESETS)}; or a .yaml file)")
    for text in overrides:
        pass_name, key, value = _parse_override(text)
        if pass_name in ("gates", "export"):
            fields = gate_fields if pass_name == "gates" else export_fields
            fields[key] = _read_override(f"--set {_excerpt(text)}", value)
            continue
        if pass_name not in PASSES:
            raise UserError(f"--set {_excerpt(text)}: unknown pass {_excerpt(pass_name)} "
                            f"({_did_you_mean(pass_name, PASSES)})")
        passes.setdefault(pass_name, {})[key] = value
    notes = _move_fields(passes)
    order = sorted(passes, key=lambda p: PASSES[p].stage)  # a pass added by --set takes its stage's place
    built = tuple((pass_name, _build(pass_name, passes[pass_name])) for pass_name in order)
    label = name if not overrides else f"{name} + {' '.join(overrides)}"
    return Recipe(label, built, _build_section(Gates, "gates", gate_fields),
                  _build_section(Export, "export", export_fields), notes)


def check_recipe_takes(recipe: Recipe, adapter) -> None:
    """The recipe against what an input adapter (compressor.inputs.InputAdapter) can take, before it loads."""
    if recipe.export.dtype != "float32" and adapter.kind == "onnx":
        raise UserError(f"export.dtype {recipe.export.dtype} needs a checkpoint input: an "
                        f"{adapter.kind.upper()} input is written back at its own float32")
    if recipe.export.dtype != "float32" and any(isinstance(c, QuantizeConfig) and c.activations != "none"
                                                for _, c in recipe.passes):
        raise UserError("quantize.activations needs export.dtype float32: ONNX Runtime's integer MatMul kernels "
                        "(MatMulIntegerToFloat, DynamicQuantizeMatMul) produce float32")
    for name, config in recipe.passes:
        if adapter.passes is not None and name not in adapter.passes:
            raise UserError(f"{name} needs the torch model: an {adapter.kind.upper()} input takes only "
                            f"{', '.join(adapter.passes)} (run it on the checkpoint instead)")
        if not adapter.calibrates and config.needs_calibration:
            raise UserError(f"{name} {config.label()} needs calibration through the torch model: an "
                            f"{adapter.kind.upper()} input takes round-to-nearest quantization only")


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
                raise UserError(f"recipe {_excerpt(recipe.name)} does not fit the model: {pass_name}: "
                                f"{_one_line(exc)}") from None
        if spec.reshapes:
            return

"""The k-bit weight quantization pass: nn.Linear weights -> k-bit codes of one data type, fake-quantized in
place (module.weight = the exact dequantized values). What it chose per layer goes to the exporter as data: the
record's `quantized` entry, {module name: QuantizedLayer}."""
import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from passes import quant_primitives as qp
from passes.calibration import (check_calibration_samples, check_int, check_patterns, excerpt, input_second_moments,
                                matches, selected_linears, split_by_input_multiple)
from passes.bit_allocator import allocate, check_budget, record_allocation
from passes.blockwise import quantize_blockwise
from passes.gptq import gptq_quantize
from passes.model_bits import total_model_bits

DTYPES = ("int", "log2", "float", "nf", "quantile", "kmeans")
SEQUENTIAL = ("layer", "block", "none")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
ZERO_POINTS = ("int", "float")
# what `overrides` may change for the layers it names; selection and calibration stay the pass's own
NOT_OVERRIDABLE = ("targets", "ignore", "overrides", "sequential", "calibration_samples")
MAX_KMEANS_ITERATIONS = 10_000  # Lloyd iterations converge in tens; 10k is already minutes per large layer


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized nn.Linear as the exporter needs it: the codes, scales, zero points / codebook (`quantized`,
    for the weight [out, in]) and every name its weight parameter goes by (a tied embedding shares it)."""
    module: str
    weight_names: tuple[str, ...]
    quantized: qp.Quantized


@dataclass(frozen=True)
class QuantizeConfig:
    dtype: str = "int"
    bits: int = 4
    block_size: int = 64  # B along the input dim; 0 = per-channel, -1 = per-tensor
    symmetric: bool = True  # int only: absmax (True) or min-max with zero point (False)
    zero_point: str = "int"  # asymmetric int: "int" (ONNX's, 0 on a level) or "float" (block minimum, Q4_1 style)
    full_range: bool = False  # int symmetric only: also use level -2^(k-1) (Q4_0 / ORT style)
    scale_dtype: str = "float32"
    method: str = "rtn"  # or "gptq" (int only)
    exponent_bits: int | None = None  # float only; default ceil(k/2)
    codebook_scope: str = "tensor"  # quantile / kmeans: one codebook per tensor or per output row
    kmeans_iterations: int = 25
    activation_weighted: bool = False  # kmeans: weight each weight by its input channel's mean x²
    calibration_samples: int = 64
    gptq_damp: float = 0.01
    # GPTQ / weighted k-means: how layers see the earlier layers' quantization. "layer": inputs re-measured before
    # each layer (one calibration pass per layer); "block": block by block, replaying only the block (GPTQ's way,
    # about two passes in all: for models of hundreds of layers); "none": one pass of the unquantized model
    sequential: str = "layer"
    targets: tuple[str, ...] = ("re:.*",)  # nn.Linear names; "re:" prefix = regular expression (search)
    ignore: tuple[str, ...] = ()
    # mixed precision: {pattern: {field: value}}; a layer takes the first pattern it matches, e.g.
    # {"re:lm_head": {"bits": 8, "block_size": 32}} keeps the output layer at 8 bits (llama.cpp's K-quant mixes)
    overrides: dict[str, dict] | None = None
    # bit-budget allocator (passes/bit_allocator.py): per-layer (dtype, k, B) from measured sensitivity so that the
    # whole model's total bits / params stays <= this; candidates as labels (int4-B64-full, nf3-B128, ...)
    budget_bits_per_param: float | None = None
    budget_candidates: tuple[str, ...] = ()  # empty: bit_allocator.DEFAULT_CANDIDATES

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"quantize.dtype must be one of {', '.join(DTYPES)}, not {excerpt(self.dtype)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"quantize.bits must be an integer in 2..8, not {excerpt(self.bits)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or (
                self.block_size not in (qp.PER_CHANNEL, qp.PER_TENSOR) and (
                self.block_size < 16 or self.block_size > 1024 or self.block_size & (self.block_size - 1))):
            raise ValueError(f"quantize.block_size must be a power of two in 16..1024, 0 (per-channel) or -1 "
                             f"(per-tensor), not {excerpt(self.block_size)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"quantize.scale_dtype must be float32 or float16, not {excerpt(self.scale_dtype)}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"quantize.method must be rtn or gptq, not {excerpt(self.method)}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"quantize.zero_point must be int or float, not {excerpt(self.zero_point)}")
        for name in ("symmetric", "full_range", "activation_weighted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantize.{name} must be true or false, not {excerpt(getattr(self, name))}")
        if self.exponent_bits is not None:  # a float of 2..8 bits has 1 sign bit and 1..7 exponent bits
            check_int("quantize.exponent_bits", self.exponent_bits, 1, 7)
        if self.zero_point == "float" and (self.dtype != "int" or self.symmetric or self.block_size <= 0):
            raise ValueError("quantize.zero_point=float needs dtype=int, symmetric=false and a block size")
        if self.zero_point == "float" and self.method != "rtn":
            raise ValueError("quantize.zero_point=float works with method=rtn only")
        if self.method == "gptq" and self.dtype != "int":
            raise ValueError("quantize.method=gptq works with dtype=int only")
        if self.method == "gptq" and self.block_size == qp.PER_TENSOR:
            raise ValueError("quantize.method=gptq needs per-channel (0) or block-wise scales")
        if self.dtype == "float":
            qp.float_codebook(self.bits, self.exponent_bits)  # raises on an impossible split
        if self.codebook_scope not in ("tensor", "row"):
            raise ValueError(f"quantize.codebook_scope must be tensor or row, not {excerpt(self.codebook_scope)}")
        check_int("quantize.kmeans_iterations", self.kmeans_iterations, 1, MAX_KMEANS_ITERATIONS)
        if isinstance(self.gptq_damp, bool) or not 0 < self.gptq_damp < math.inf:  # also refuses NaN
            raise ValueError(f"quantize.gptq_damp must be a positive number, not {excerpt(self.gptq_damp)}")
        if self.sequential not in SEQUENTIAL:
            raise ValueError(f"quantize.sequential must be one of {', '.join(SEQUENTIAL)}, not "
                             f"{excerpt(self.sequential)}")
        check_calibration_samples("quantize", self.calibration_samples)
        check_patterns("quantize", targets=self.targets, ignore=self.ignore)
        check_budget(self)
        self._check_overrides()

    def _check_overrides(self) -> None:
        if self.overrides is None:
            return
        if not isinstance(self.overrides, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.overrides.items()):
            raise ValueError("quantize.overrides must map module names / re: patterns to {field: value} mappings, "
                             f"not {excerpt(self.overrides)}")
        check_patterns("quantize", overrides=tuple(self.overrides))
        known = {f.name for f in dataclasses.fields(self)}
        for pattern, fields in self.overrides.items():
            for key in fields:
                if key in NOT_OVERRIDABLE or key not in known:
                    raise ValueError(f"quantize.overrides[{excerpt(pattern)}]: {excerpt(key)} cannot be overridden "
                                     f"per layer (allowed: {', '.join(sorted(known - set(NOT_OVERRIDABLE)))})")
            try:
                dataclasses.replace(self, overrides=None, **fields)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"quantize.overrides[{excerpt(pattern)}]: {exc}") from None

    def for_layer(self, name: str) -> "QuantizeConfig":
        """This config with the first matching override applied (the pass's own config when none matches)."""
        for pattern, fields in (self.overrides or {}).items():
            if matches(name, (pattern,)):
                return dataclasses.replace(self, overrides=None, **fields)
        return self

    def layer_configs(self) -> list["QuantizeConfig"]:
        return [self] + [dataclasses.replace(self, overrides=None, **f) for f in (self.overrides or {}).values()]

    @property
    def input_multiple(self) -> int | None:
        """What must divide a layer's in_features for it to be quantized (blocks run along the input dim). Plain
        int rounding takes a shorter last block (ONNX's ceil(K / B) blocks); codebooks and GPTQ need whole ones."""
        if self.block_size <= 0 or (self.dtype == "int" and self.method == "rtn"):
            return None
        return self.block_size

    @property
    def needs_calibration(self) -> bool:
        if self.budget_bits_per_param is not None:  # the allocator measures sensitivity on calibration data
            return True
        return any(c.method == "gptq" or (c.dtype == "kmeans" and c.activation_weighted)
                   for c in self.layer_configs())

    def label(self) -> str:
        if self.budget_bits_per_param is not None:
            return f"budget {self.budget_bits_per_param:g} bits/param"
        base = self._own_label()
        if not self.overrides:
            return base
        others = ", ".join(f"{pattern.removeprefix('re:')}: "
                           f"{dataclasses.replace(self, overrides=None, **fields)._own_label()}"
                           for pattern, fields in self.overrides.items())
        return f"{base} ({others})"

    def _own_label(self) -> str:
        granularity = {0: "channel", -1: "tensor"}.get(self.block_size, f"B{self.block_size}")
        name = "log" if self.dtype == "log2" else self.dtype
        parts = [f"{name}{self.bits}", granularity]
        if self.dtype == "int" and not self.symmetric:
            parts.append("asym" if self.zero_point == "int" else "asym-fzp")
        if self.dtype == "int" and self.symmetric and self.full_range:
            parts.append("full")
        if self.dtype == "kmeans" and self.activation_weighted:
            parts.append("aw")
        if self.dtype in ("quantile", "kmeans") and self.codebook_scope == "row":
            parts.append("row")
        if self.method == "gptq":
            parts.append("gptq")
        return "-".join(parts)


def quantizable(model: nn.Module, config: QuantizeConfig) -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """The recipe's targets, less the layers whose input width their block size does not divide; ValueError when
    that leaves none. Shapes only: works on a model on the meta device (recipe checks before weights load)."""
    selected, ignored = selected_linears(model, config.targets, config.ignore)
    if not config.overrides:
        chosen, skipped = split_by_input_multiple(selected, config.input_multiple, f"block_size {config.block_size}")
        return chosen, ignored + skipped
    if not selected:
        split_by_input_multiple(selected)  # raises: the targets select nothing
    chosen, skipped = [], []
    for name, module in selected:  # each layer against its own block size
        multiple = config.for_layer(name).input_multiple
        if multiple and module.in_features % multiple:
            skipped.append({"module": name, "reason": f"in_features {module.in_features} not divisible by "
                                                      f"block_size {multiple}"})
        else:
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"the block sizes of the recipe and its overrides divide the in_features of none of the "
                         f"{len(selected)} selected nn.Linear layers")
    return chosen, ignored + skipped


def _quantize_weight(weight: torch.Tensor, config: QuantizeConfig, hessian: torch.Tensor | None) -> qp.Quantized:
    scale_dtype = SCALE_DTYPES[config.scale_dtype]
    bits, block = config.bits, config.block_size
    if config.dtype == "int":
        if config.method == "gptq":
            return gptq_quantize(weight, hessian, bits, block, config.symmetric, scale_dtype, config.gptq_damp,
                                 config.full_range)
        if config.symmetric:
            return qp.quantize_int_symmetric(weight, bits, block, scale_dtype, config.full_range)
        if config.zero_point == "float":
            return qp.quantize_int_float_zero(weight, bits, block, scale_dtype)
        return qp.quantize_int_asymmetric(weight, bits, block, scale_dtype)
    if config.dtype in ("log2", "float", "nf"):
        codebook = {"log2": lambda: qp.log2_codebook(bits), "nf": lambda: qp.normal_float_codebook(bits),
                    "float": lambda: qp.float_codebook(bits, config.exponent_bits)}[config.dtype]()
        return qp.quantize_codebook(weight, codebook, bits, block, scale_dtype)
    normalized = qp.normalized_groups(weight, block, scale_dtype)
    if config.dtype == "quantile":
        if config.codebook_scope == "row":
            codebook = torch.stack([qp.quantile_codebook(row, bits) for row in normalized])
        else:
            codebook = qp.quantile_codebook(normalized, bits)
        return qp.quantize_codebook(weight, codebook, bits, block, scale_dtype)
    importance = None
    if config.activation_weighted:
        importance = torch.diag(hessian).float()[None, :].expand_as(weight)
    if config.codebook_scope == "row":
        codebook = qp.kmeans_codebook(normalized, bits, importance, config.kmeans_iterations)
    else:
        flat_importance = None if importance is None else importance.reshape(1, -1)
        codebook = qp.kmeans_codebook(normalized.reshape(1, -1), bits, flat_importance, config.kmeans_iterations)[0]
    return qp.quantize_codebook(weight, codebook, bits, block, scale_dtype)


def quantize_model(model: nn.Module, config: QuantizeConfig, calibration: list[tuple] | None = None,
                   progress: bool = False) -> dict:
    """Quantize the selected Linear weights of `model` in place; returns the pass record for the report, whose
    `quantized` entry ({module name: QuantizedLayer}) the pipeline takes out and hands to the exporter."""
    budgeted = allocation = None
    if config.budget_bits_per_param is not None:  # becomes one exact-name override per layer, then as usual
        budgeted, (config, allocation) = config, allocate(model, config, calibration, _quantize_weight, progress)
    if config.needs_calibration and not calibration:
        raise ValueError(f"{config.label()} needs calibration batches and none were given")
    chosen, skipped = quantizable(model, config)
    layers, quantized = [], {}
    aliases: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(param_name)

    def quantize_layer(name: str, module: nn.Linear, hessian: torch.Tensor | None) -> None:
        weight = module.weight.detach().float()
        q = _quantize_weight(weight, config.for_layer(name), hessian)
        approx = qp.dequantize(q)
        module.weight.data = approx.to(module.weight.dtype)
        # codes fit in 16 bits (k <= 8): a quarter of int64's memory while they wait for the exporter
        q = dataclasses.replace(q, codes=q.codes.to(torch.int16))
        quantized[name] = QuantizedLayer(name, tuple(aliases.get(id(module.weight), [f"{name}.weight"])), q)
        layers.append({"module": name, "shape": list(weight.shape), "bits": q.bits,
                       "relative_mse": qp.relative_mse(weight, approx)})

    bar = tqdm(total=len(chosen), desc=f"quantize {config.label()}", disable=not progress, leave=False)
    rest = chosen
    if config.needs_calibration and config.sequential == "block":
        rest = quantize_blockwise(model, chosen, calibration, quantize_layer, bar)
    hessians = {}
    if config.needs_calibration and config.sequential != "layer" and rest:  # one pass for what is left
        modules = [module for name, module in rest if config.for_layer(name).needs_calibration]
        hessians = dict(zip(map(id, modules), input_second_moments(model, modules, calibration)))
    for name, module in rest:
        hessian = hessians.pop(id(module), None)
        if hessian is None and config.for_layer(name).needs_calibration:  # sequential: statistics see earlier layers quantized
            hessian = input_second_moments(model, [module], calibration)[0]
        quantize_layer(name, module, hessian)
        bar.update(1)
    bar.close()
    order = {name: i for i, (name, _) in enumerate(chosen)}
    layers.sort(key=lambda entry: order[entry["module"]])  # report in model order, however they were visited
    quantized = {name: quantized[name] for name, _ in chosen}
    unmatched = [p for p in config.overrides or {} if not any(matches(name, (p,)) for name, _ in chosen)]
    record = {"name": "quantize", "config": asdict(config), "label": config.label(), "layers": layers,
            "skipped": skipped, "overrides_unmatched": unmatched, **total_model_bits(model, quantized),
            "quantized": quantized}
    return record if budgeted is None else record_allocation(record, budgeted, allocation)

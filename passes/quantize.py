"""The k-bit weight quantization pass: nn.Linear weights -> k-bit codes of one data type, fake-quantized in
place (module.weight = the exact dequantized values). What it chose per layer goes to the exporter as data: the
record's `quantized` entry, {module name: QuantizedLayer}. Its settings are passes.quantize_config.QuantizeConfig."""
import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from passes import quant_primitives as qp
from passes.activation_quant import ActivationQuant, calibrate_static, dividing_inputs, smooth_layers
from passes.calibration import input_second_moments, matches, selected_linears, split_by_input_multiple
from passes.bit_allocator import allocate, record_allocation
from passes.blockwise import quantize_blockwise
from passes.gptq import gptq_quantize
from passes.model_bits import total_model_bits
from passes.quantize_config import SCALE_DTYPES, QuantizeConfig

@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized nn.Linear (or nn.Embedding table, `embedding`) as the exporter needs it: the codes, scales,
    zero points / codebook (`quantized`, for the weight [out, in], a table [rows, dim]), every name its weight
    parameter goes by (a tied embedding shares it) and how its input is quantized (`activation`, or None)."""
    module: str
    weight_names: tuple[str, ...]
    quantized: qp.Quantized
    activation: ActivationQuant | None = None
    embedding: bool = False


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
        layer_config = config.for_layer(name)
        q = _quantize_weight(weight, layer_config, hessian)
        if layer_config.activations != "none" and layer_config.integer_weights == "uint8":
            q = _as_unsigned(q)
        approx = qp.dequantize(q)
        module.weight.data = approx.to(module.weight.dtype)
        # codes fit in 16 bits (k <= 8): a quarter of int64's memory while they wait for the exporter
        q = dataclasses.replace(q, codes=q.codes.to(torch.int16))
        quantized[name] = QuantizedLayer(name, tuple(aliases.get(id(module.weight), [f"{name}.weight"])), q)
        layers.append({"module": name, "shape": list(weight.shape), "bits": q.bits,
                       "relative_mse": qp.relative_mse(weight, approx)})

    # W8A8: SmoothQuant first (the weights become W * s, quantized as such), the ranges last (on quantized weights)
    with_activations = {name: module for name, module in chosen if config.for_layer(name).activations != "none"}
    smoothed = {name: module for name, module in with_activations.items()
                if config.for_layer(name).smoothquant_alpha is not None}
    smooth = smooth_layers(model, smoothed, calibration, config.smoothquant_alpha) if smoothed else {}
    weights_need_statistics = any(c.method == "gptq" or (c.dtype == "kmeans" and c.activation_weighted)
                                  for c in config.layer_configs())
    bar = tqdm(total=len(chosen), desc=f"quantize {config.label()}", disable=not progress, leave=False)
    rest = chosen
    with dividing_inputs(dict(chosen), smooth):  # GPTQ's statistics are of what the smoothed layers will see
        if weights_need_statistics and config.sequential == "block":
            rest = quantize_blockwise(model, chosen, calibration, quantize_layer, bar)
        hessians = {}
        if weights_need_statistics and config.sequential != "layer" and rest:  # one pass for what is left
            modules = [module for name, module in rest if _weight_needs_statistics(config.for_layer(name))]
            hessians = dict(zip(map(id, modules), input_second_moments(model, modules, calibration)))
        for name, module in rest:
            hessian = hessians.pop(id(module), None)
            if hessian is None and _weight_needs_statistics(config.for_layer(name)):
                hessian = input_second_moments(model, [module], calibration)[0]  # sequential: sees earlier layers
            quantize_layer(name, module, hessian)
            bar.update(1)
    bar.close()
    order = {name: i for i, (name, _) in enumerate(chosen)}
    layers.sort(key=lambda entry: order[entry["module"]])  # report in model order, however they were visited
    quantized = {name: quantized[name] for name, _ in chosen}
    activation_records = _quantize_activations(model, config, with_activations, smooth, calibration, quantized)
    embedding_records = _quantize_embeddings(model, config, aliases, quantized)
    unmatched = [p for p in config.overrides or {} if not any(matches(name, (p,)) for name, _ in chosen)]
    record = {"name": "quantize", "config": asdict(config), "label": config.label(), "layers": layers,
              "skipped": skipped, "overrides_unmatched": unmatched, **total_model_bits(model, quantized),
              **({"activations": activation_records} if activation_records else {}),
              **({"embeddings": embedding_records} if embedding_records else {}),
              "quantized": quantized}
    return record if budgeted is None else record_allocation(record, budgeted, allocation)


def _as_unsigned(q: qp.Quantized) -> qp.Quantized:
    """Symmetric int8 codes as uint8 ones with zero point 128: the same values, for ONNX Runtime's U8U8 GEMM."""
    return dataclasses.replace(q, codes=q.codes + 128, zero_points=torch.full(q.scales.shape, 128, dtype=torch.long))


def _weight_needs_statistics(config: QuantizeConfig) -> bool:
    return config.method == "gptq" or (config.dtype == "kmeans" and config.activation_weighted)


def _quantize_activations(model: nn.Module, config: QuantizeConfig, layers: dict[str, nn.Linear],
                          smooth: dict[str, torch.Tensor], calibration: list[tuple] | None,
                          quantized: dict) -> list[dict]:
    """Each activation-quantized layer's record gains its ActivationQuant; returns the report's entries."""
    groups: dict[tuple, dict[str, nn.Linear]] = {}  # one calibration sweep per distinct observer setting
    for name, module in layers.items():
        c = config.for_layer(name)
        if c.activations == "static":
            groups.setdefault((c.activation_observer, c.activation_percentile, c.activation_dtype), {})[name] = module
    found = {}
    for observer, group in groups.items():
        found.update(calibrate_static(model, group, calibration, smooth, *observer))
    for name in layers:
        if name not in found:
            found[name] = ActivationQuant("dynamic", smooth=smooth.get(name))
        quantized[name] = dataclasses.replace(quantized[name], activation=found[name])
    return [found[name].record(name) for name in quantized if name in found]


def _quantize_embeddings(model: nn.Module, config: QuantizeConfig, aliases: dict[int, list[str]],
                         quantized: dict) -> list[dict]:
    """nn.Embedding tables as int codes along their rows (a table [V, D] is quantized like a Linear weight [out,
    in]); a table tied to a quantized Linear already shares that layer's codes and is left to it."""
    if config.embedding_bits is None:
        return []
    modules = dict(model.named_modules())
    taken = {id(modules[name].weight) for name in quantized}
    records = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or id(module.weight) in taken or matches(name, config.ignore):
            continue
        table = module.weight.detach().float()
        q = qp.quantize_int_symmetric(table, config.embedding_bits, config.embedding_block_size,
                                      SCALE_DTYPES[config.scale_dtype], full_range=config.embedding_bits == 4)
        approx = qp.dequantize(q)
        module.weight.data = approx.to(module.weight.dtype)
        q = dataclasses.replace(q, codes=q.codes.to(torch.int16))
        quantized[name] = QuantizedLayer(name, tuple(aliases.get(id(module.weight), [f"{name}.weight"])), q,
                                         embedding=True)
        taken.add(id(module.weight))
        records.append({"module": name, "shape": list(table.shape), "bits": q.bits,
                        "block_size": config.embedding_block_size, "relative_mse": qp.relative_mse(table, approx)})
    return records

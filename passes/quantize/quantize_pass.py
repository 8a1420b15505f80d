"""The k-bit quantize pass: nn.Linear weights -> k-bit codes of one scheme per layer, fake-quantized in place
(module.weight = the exact dequantized values). What it chose per layer goes to the exporter as data: the
record's `quantized` entry, {module name: QuantizedLayer}. Its settings are passes.quantize.config.QuantizeConfig;
the schemes (int_weights, codebook, activations, embeddings) do the work."""
import dataclasses
from dataclasses import asdict

import torch
from torch import nn
from tqdm import tqdm

from passes import quant_primitives as qp
from passes.bit_allocator import allocate, record_allocation
from passes.blockwise import quantize_blockwise
from passes.calibration import excerpt, input_second_moments, matches, selected_linears, split_by_input_multiple
from passes.model_bits import total_model_bits
from passes.quantize.activations import ActivationQuant, calibrate_static
from passes.hooks import dividing_inputs
from passes.smoothquant import take_smoothing
from passes.quantize.config import QuantizeConfig
from passes.quantize.embeddings import quantize_tables
from passes.quantize.record import QuantizedLayer
from passes.quantize.rows import quantize_rows


def quantizable(model: nn.Module, config: QuantizeConfig) -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """The recipe's targets, less the layers whose input width their block size does not divide; ValueError when
    that leaves none. Shapes only: works on a model on the meta device (recipe checks before weights load)."""
    if config.embedding_scheme() is not None and not any(isinstance(m, nn.Linear) for m in model.modules()):
        return [], []  # tables alone (a streamed run's token table): the pass quantizes those
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


def quantize_weight(weight: torch.Tensor, config: QuantizeConfig, hessian: torch.Tensor | None) -> qp.Quantized:
    """One weight [out, in] quantized by the weight scheme `config` names (hessian: its input second moments,
    for schemes that need them)."""
    return config.weight_scheme().quantize(weight, hessian)


def quantize_model(model: nn.Module, config: QuantizeConfig, calibration: list[tuple] | None = None,
                   progress: bool = False) -> dict:
    """Quantize the selected Linear weights of `model` in place; returns the pass record for the report, whose
    `quantized` entry ({module name: QuantizedLayer}) the pipeline takes out and hands to the exporter."""
    budgeted = allocation = None
    if config.budget_bits_per_param is not None:  # becomes one exact-name override per layer, then as usual
        budgeted, (config, allocation) = config, allocate(model, config, calibration, quantize_weight, progress)
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
        scheme, activation = layer_config.weight_scheme(), layer_config.activation_scheme()
        q = quantize_rows(lambda rows: scheme.quantize(rows, hessian), weight,
                          getattr(scheme, "rows_independent", False))
        if activation is not None:
            q = activation.stored_weights(q)
        approx = qp.dequantize(q)
        module.weight.data = approx.to(module.weight.dtype)
        # codes fit in 16 bits (k <= 8): a quarter of int64's memory while they wait for the exporter
        q = dataclasses.replace(q, codes=q.codes.to(torch.int16))
        quantized[name] = QuantizedLayer(name, tuple(aliases.get(id(module.weight), [f"{name}.weight"])), q, scheme,
                                         tied_table=layer_config.tied_table)
        layers.append({"module": name, "shape": list(weight.shape), "bits": q.bits,
                       "relative_mse": qp.relative_mse(weight, approx)})

    # W8A8: the weights of smoothed layers hold W * s (quantized as such); the ranges last (on quantized weights)
    with_activations = {name: module for name, module in chosen if config.for_layer(name).activations != "none"}
    smooth = take_smoothing(model)  # the smoothquant pass's scales: this pass now divides the inputs by them
    unquantized = [name for name in smooth if name not in with_activations]
    if unquantized:
        raise ValueError(f"smoothquant smoothed {len(unquantized)} layers whose inputs this pass does not quantize "
                         f"(e.g. {excerpt(unquantized[0])}): give smoothquant the same targets and ignore")
    schemes = [c.weight_scheme() for c in config.layer_configs()]
    weights_need_statistics = any(scheme.needs_statistics for scheme in schemes)
    # H's diagonal is enough when every scheme that reads statistics reads only that (no K x K matrices)
    diagonal = all(scheme.diagonal_statistics for scheme in schemes if scheme.needs_statistics)
    bar = tqdm(total=len(chosen), desc=f"quantize {config.label()}", disable=not progress, leave=False)
    rest = chosen
    with dividing_inputs(dict(chosen), smooth):  # GPTQ's statistics are of what the smoothed layers will see
        if weights_need_statistics and config.sequential == "block":
            rest = quantize_blockwise(model, chosen, calibration, quantize_layer, bar)
        hessians = {}
        if weights_need_statistics and config.sequential != "layer" and rest:  # one pass for what is left
            modules = [module for name, module in rest if config.for_layer(name).weight_scheme().needs_statistics]
            hessians = dict(zip(map(id, modules), input_second_moments(model, modules, calibration, diagonal)))
        for name, module in rest:
            hessian = hessians.pop(id(module), None)
            if hessian is None and config.for_layer(name).weight_scheme().needs_statistics:
                hessian = input_second_moments(model, [module], calibration, diagonal)[0]  # sees earlier layers
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
    """nn.Embedding tables as int codes along their rows (passes.quantize.embeddings); a table tied to a
    quantized Linear already shares that layer's codes and is left to it."""
    scheme = config.embedding_scheme()
    if scheme is None:
        return []
    modules = dict(model.named_modules())
    taken = {id(modules[name].weight) for name in quantized}
    tables, records = quantize_tables(model, scheme, config.ignore, taken, aliases,
                                      lambda name, names, q: QuantizedLayer(name, names, q, scheme, embedding=True))
    quantized.update(tables)
    return records

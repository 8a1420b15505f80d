"""The bit-budget allocator (quantize.budget_bits_per_param): per-layer (dtype, k, B) under a total-model-bits
budget, from sensitivity measured on calibration data and an exact multiple-choice knapsack.

Sensitivity. For layer l and candidate c, the predicted loss increase is the second-order (Fisher) estimate of the
KL divergence between the model's next-token distributions before and after quantizing that layer alone:

    D_l(c) = 1/2 · Σ_o F_o · (ΔW H ΔWᵀ)_oo / T

ΔW = the candidate's dequantized weight minus the weight, H = Σ x xᵀ over the T calibration tokens (the layer's
input second moments, as GPTQ uses them), F_o = the mean over tokens of (∂ log p(ŷ)/∂y_o)², the squared gradient
of the model's log-likelihood w.r.t. the layer's output o with labels ŷ sampled from the model itself (the Fisher
of its own distribution: no labels needed, any model whose output ends in logits). tr(ΔW H ΔWᵀ) alone ranks the
candidates of one layer exactly (it is the layer's output error on calibration data), but its units differ from
layer to layer; F turns it into nats per token, so that layers can be traded against each other. Both come from
one forward + backward sweep of the calibration batches; then every candidate is one quantization and one
[N, K] x [K, K] product per layer. (The alternative, the calibration loss of quantizing each layer alone, costs
a forward pass of the data per layer and candidate: 211 layers x 36 candidates on SmolLM2.) D is additive over
layers at second order; the knapsack minimizes Σ_l D_l(c_l).

Budget. Bits are counted exactly as passes.model_bits.total_model_bits counts them: each candidate's bits are its
quantized tensor's own count (codes, scales, zero points, codebook), the other parameters at 32 bits; the
allocation's total is ≤ floor(budget x params), asserted here and checked again against the pass's record.

Optimizer. A multiple-choice knapsack solved by dynamic programming over the bits above every layer's cheapest
candidate, in units of their greatest common divisor: exact. When that would take more than MAX_UNITS units, the
unit is coarsened (each cost rounded up, so the budget still holds) and a greedy repair spends the bits left
over on the upgrades with the best loss decrease per bit.
"""
import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from passes import quant_primitives as qp
from passes.calibration import excerpt, matches, selected_linears
from passes.model_bits import UNQUANTIZED_BITS, quantized_tensor_bits
from passes.quantize.labels import weight_fields, weight_label

BUDGET_FIELDS = ("budget_bits_per_param", "budget_candidates")
# int symmetric with level -2^(k-1) (ORT's MatMulNBits kernel) at every k, NormalFloat where it beats int (k <= 4);
# block sizes 32 / 64 / 128 and per output channel
DEFAULT_CANDIDATES = tuple(weight_label("int", k, b, "full") for k in (2, 3, 4, 5, 6, 8) for b in (32, 64, 128, 0)) \
    + tuple(weight_label("nf", k, b) for k in (2, 3, 4) for b in (32, 64, 128, 0))
MAX_UNITS = 100_000  # DP columns: exact below, coarsened (and repaired) above


def check_budget(config) -> None:
    """QuantizeConfig.__post_init__'s checks of the budget fields (ValueError, one line)."""
    for pattern, fields in (config.overrides or {}).items() if isinstance(config.overrides, dict) else ():
        for key in set(BUDGET_FIELDS) & set(fields if isinstance(fields, dict) else ()):
            raise ValueError(f"quantize.overrides[{excerpt(pattern)}]: {key} is a whole-model setting")
    budget, candidates = config.budget_bits_per_param, config.budget_candidates
    if not isinstance(candidates, tuple) or not all(isinstance(c, str) for c in candidates):
        raise ValueError(f"quantize.budget_candidates must be a list of candidates such as int4-B64-full, not "
                         f"{excerpt(candidates)}")
    if budget is None:
        if candidates:
            raise ValueError("quantize.budget_candidates needs quantize.budget_bits_per_param")
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
        raise ValueError(f"quantize.budget_bits_per_param must be a positive number of bits per parameter, not "
                         f"{excerpt(budget)}")
    if config.overrides:
        raise ValueError("quantize.budget_bits_per_param chooses every layer's settings itself: drop "
                         "quantize.overrides (or the budget)")
    for label in candidates or DEFAULT_CANDIDATES:
        fields = weight_fields(label)
        try:
            dataclasses.replace(config, budget_bits_per_param=None, budget_candidates=(), **fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"quantize.budget_candidates: {label}: {exc}") from None


def candidate_config(config, label: str):
    return dataclasses.replace(config, budget_bits_per_param=None, budget_candidates=(), overrides=None,
                               **weight_fields(label))


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def layer_statistics(model: nn.Module, layers: list[tuple[str, nn.Linear]], calibration: list[tuple],
                     seed: int = 0) -> list[dict]:
    """Per layer, in one forward + backward sweep of the calibration batches: H = Σ x xᵀ [K, K], F [N] = Σ over
    tokens of the squared output gradient of log p(labels sampled from the model), and the token count T."""
    stats = [{"H": torch.zeros(m.in_features, m.in_features, dtype=torch.float64),
              "F": torch.zeros(m.out_features, dtype=torch.float64), "tokens": 0} for _, m in layers]
    outputs: list[tuple[int, torch.Tensor]] = []
    moments: dict[int, tuple] = {}  # x xᵀ of this batch by input tensor: q/k/v (gate/up) share one

    def hook_for(index: int, module: nn.Linear):
        def hook(_, inputs, output):
            key = id(inputs[0])
            if key not in moments:
                x = inputs[0].detach().reshape(-1, module.in_features).double()
                moments[key] = (x.T @ x, x.shape[0], inputs[0])  # the tensor kept: its id stays unique
            stats[index]["H"].add_(moments[key][0])
            stats[index]["tokens"] += moments[key][1]
            outputs.append((index, output))
        return hook

    weights = {id(m.weight): m.weight for _, m in layers}
    flags = {key: w.requires_grad for key, w in weights.items()}
    generator = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_hook(hook_for(i, m)) for i, (_, m) in enumerate(layers)]
    try:
        for w in weights.values():
            w.requires_grad_(True)  # puts the layer outputs on the autograd graph
        with torch.enable_grad():
            for batch in calibration:
                outputs.clear()
                moments.clear()
                logits = _logits(model(*batch)).float()
                log_probs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
                labels = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)
                likelihood = log_probs.gather(1, labels).sum()
                grads = torch.autograd.grad(likelihood, [out for _, out in outputs], allow_unused=True)
                for (index, out), grad in zip(outputs, grads):
                    if grad is not None:
                        stats[index]["F"].add_((grad.detach().reshape(-1, out.shape[-1]).double() ** 2).sum(0))
                del logits, log_probs, likelihood, grads
    finally:
        outputs.clear()
        moments.clear()
        for handle in handles:
            handle.remove()
        for key, w in weights.items():
            w.requires_grad_(flags[key])
    for layer in stats:  # summed in float64; float32 is plenty for the error products and halves the memory
        layer["H"] = layer["H"].float()
    return stats


def predicted_kl(weight: torch.Tensor, approx: torch.Tensor, stats: dict) -> float:
    """D = 1/2 Σ_o F̄_o (ΔW H ΔWᵀ)_oo / T: nats per token (see the module docstring)."""
    tokens = max(stats["tokens"], 1)
    delta = (approx.float() - weight.float())
    output_error = ((delta @ stats["H"].float()) * delta).sum(1).double()  # (ΔW H ΔWᵀ)_oo, summed over tokens
    return float(0.5 * (stats["F"] / tokens * output_error).sum() / tokens)


def solve_knapsack(costs: list[list[int]], losses: list[list[float]], capacity: int,
                   max_units: int = MAX_UNITS) -> tuple[list[int], str]:
    """One candidate per layer minimizing Σ losses with Σ costs ≤ capacity (integers). Returns (choice per layer,
    how it was solved). Exact DP when the bits above the cheapest choices fit max_units units of their gcd."""
    if sum(min(c) for c in costs) > capacity:
        raise ValueError("infeasible")
    # only the candidates no other one beats on both bits and loss
    kept = []
    for layer_costs, layer_losses in zip(costs, losses):
        order = sorted(range(len(layer_costs)), key=lambda j: (layer_costs[j], layer_losses[j]))
        front, best = [], math.inf
        for j in order:
            if layer_losses[j] < best:
                front.append(j)
                best = layer_losses[j]
        kept.append(front)
    floor = [costs[l][front[0]] for l, front in enumerate(kept)]
    spare = capacity - sum(floor)
    extras = [[costs[l][j] - floor[l] for j in front] for l, front in enumerate(kept)]
    unit = math.gcd(*[e for layer in extras for e in layer if e]) or 1
    method = "exact DP"
    if spare // unit > max_units:
        unit = -(-spare // max_units)
        method = f"DP at a {unit:,}-bit unit + greedy repair"
    width = spare // unit + 1
    best = np.zeros(width)
    choices = []
    for l, front in enumerate(kept):
        new = np.full(width, np.inf)
        choice = np.zeros(width, dtype=np.int32)
        for i, j in enumerate(front):
            w = -(-extras[l][i] // unit)
            if w >= width:
                continue
            value = np.full(width, np.inf)
            value[w:] = best[: width - w] + losses[l][j]
            better = value < new
            new[better] = value[better]
            choice[better] = i
        best = new
        choices.append(choice)
    picked, b = [0] * len(kept), width - 1
    for l in reversed(range(len(kept))):
        i = int(choices[l][b])
        picked[l] = i
        b -= -(-extras[l][i] // unit)
    # repair: the bits the rounding left, to the upgrade with the largest loss decrease per bit that fits
    left = spare - sum(extras[l][i] for l, i in enumerate(picked))
    while True:
        options = [((losses[l][kept[l][picked[l]]] - losses[l][j]) / (extras[l][i] - extras[l][picked[l]]), l, i)
                   for l, front in enumerate(kept) for i, j in enumerate(front)
                   if i > picked[l] and extras[l][i] - extras[l][picked[l]] <= left]
        if not options:
            break
        _, l, i = max(options)
        left -= extras[l][i] - extras[l][picked[l]]
        picked[l] = i
    chosen = [kept[l][i] for l, i in enumerate(picked)]
    assert sum(costs[l][j] for l, j in enumerate(chosen)) <= capacity
    return chosen, method


def embedding_table_bits(model: nn.Module, config, quantized_ids: set[int]) -> dict[int, int]:
    """{id(table): bits} of the nn.Embedding tables the pass quantizes after its Linear layers (its embedding
    scheme, passes.quantize.embeddings): the untied ones not ignored, quantized as that scheme will."""
    scheme = config.embedding_scheme()
    if scheme is None:
        return {}
    tables = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) and id(weight) not in quantized_ids | set(tables) \
                and not matches(name, config.ignore):
            tables[id(weight)] = quantized_tensor_bits(scheme.quantize(weight.detach().float())).total
    return tables


def allocate(model: nn.Module, config, calibration: list[tuple], quantize_weight, progress: bool = False):
    """(the config with one exact-name override per allocated layer, the allocation for the pass record).
    `quantize_weight(weight, layer_config, hessian)` is the quantize pass's own quantizer: a candidate's bits and
    error here are those of the weights the pass then writes."""
    if not calibration:
        raise ValueError("quantize.budget_bits_per_param needs calibration batches and none were given")
    selected, _ = selected_linears(model, config.targets, config.ignore)
    if not selected:
        raise ValueError("its targets / ignore select no nn.Linear layer")
    labels = list(config.budget_candidates or DEFAULT_CANDIDATES)
    configs = [candidate_config(config, label) for label in labels]
    fits = {name: [c for c, cfg in enumerate(configs) if not cfg.input_multiple
                   or module.in_features % cfg.input_multiple == 0] for name, module in selected}
    unallocated = [{"module": name, "reason": "no budget candidate's block size divides in_features "
                                              f"{module.in_features}"} for name, module in selected if not fits[name]]
    layers = [(name, module) for name, module in selected if fits[name]]
    if not layers:
        raise ValueError("no budget candidate's block size divides the in_features of any selected layer")
    params = sum(p.numel() for p in model.parameters())
    quantized_ids = {id(module.weight) for _, module in layers}
    tables = embedding_table_bits(model, config, quantized_ids)
    other_bits = sum(tables.values()) + UNQUANTIZED_BITS * sum(
        p.numel() for p in model.parameters() if id(p) not in quantized_ids and id(p) not in tables)
    capacity = math.floor(Fraction(config.budget_bits_per_param) * params)

    stats = layer_statistics(model, layers, calibration)
    costs, losses = [], []
    bar = tqdm(total=len(layers), desc="budget: sensitivity", disable=not progress, leave=False)
    for (name, module), layer_stats in zip(layers, stats):
        weight = module.weight.detach().float()
        layer_costs, layer_losses = [], []
        for c in range(len(configs)):
            if c not in fits[name]:
                layer_costs.append(capacity + 1)  # never fits
                layer_losses.append(math.inf)
                continue
            q = quantize_weight(weight, configs[c], layer_stats["H"])
            layer_costs.append(quantized_tensor_bits(q).total)
            layer_losses.append(predicted_kl(weight, qp.dequantize(q), layer_stats))
        costs.append(layer_costs)
        losses.append(layer_losses)
        layer_stats.pop("H")  # [K, K]: not kept past its layer
        bar.update(1)
    bar.close()
    cheapest = other_bits + sum(min(c) for c in costs)
    if cheapest > capacity:
        raise ValueError(f"budget_bits_per_param {config.budget_bits_per_param:g} is below the cheapest allocation, "
                         f"{cheapest / params:.4f} bits/param (every layer at its fewest-bit candidate; the "
                         f"{other_bits:,} bits of the other params count too)")
    chosen, method = solve_knapsack(costs, losses, capacity - other_bits)
    total = other_bits + sum(costs[l][c] for l, c in enumerate(chosen))
    assert total <= capacity, (total, capacity)
    rows = [{"module": name, "candidate": labels[c], "dtype": configs[c].dtype, "bits": configs[c].bits,
             "block_size": configs[c].block_size, "params": module.weight.numel(), "total_bits": costs[l][c],
             "predicted_kl": losses[l][c]}
            for l, ((name, module), c) in enumerate(zip(layers, chosen))]
    allocation = {"budget_bits_per_param": config.budget_bits_per_param, "budget_bits": capacity,
                  "total_model_bits": total, "bits_per_param": total / params, "other_bits": other_bits,
                  "predicted_kl": sum(row["predicted_kl"] for row in rows), "solver": method,
                  "sensitivity": "1/2 sum_o F_o (dW H dW^T)_oo / T: Fisher-weighted output error, nats/token",
                  "calibration_tokens": stats[0]["tokens"], "candidates": labels, "layers": rows,
                  "unallocated": unallocated}
    overrides = {name: weight_fields(labels[c]) for (name, _), c in zip(layers, chosen)}
    allocated = dataclasses.replace(config, budget_bits_per_param=None, budget_candidates=(),
                                    targets=tuple(name for name, _ in layers), overrides=overrides)
    return allocated, allocation


def record_allocation(record: dict, config, allocation: dict) -> dict:
    """The pass record of an allocated run: the recipe's own config and label, the allocation, its layers left
    unquantized; the bits the pass counted must be the allocation's, exactly."""
    assert record["total_model_bits"] == allocation["total_model_bits"] <= allocation["budget_bits"], \
        (record["total_model_bits"], allocation["total_model_bits"], allocation["budget_bits"])
    counts: dict[str, int] = {}
    for row in allocation["layers"]:
        counts[row["candidate"]] = counts.get(row["candidate"], 0) + 1
    mix = ", ".join(f"{n}x {label}" for label, n in sorted(counts.items(), key=lambda item: -item[1]))
    return {**record, "config": dataclasses.asdict(config),
            "label": f"budget {config.budget_bits_per_param:g} bits/param: {mix}",
            "skipped": record["skipped"] + allocation["unallocated"], "allocation": allocation}

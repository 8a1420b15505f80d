"""Structured pruning: remove whole attention heads and FFN neurons, physically shrinking the Linear layers
(and each attention module's head count), so the exported ONNX graph has smaller MatMuls.

Importance from calibration data: the energy a group of inputs contributes to its output projection,
trace(W_G H_GG W_Gᵀ) with H = Σ x xᵀ of the projection's inputs, G = one head's slice of out_proj's inputs or
one FFN neuron of fc_out's. The lowest-energy groups of each module go.

Families (found by class and attribute names, never by importing transformers, so passes/ runs without it):
- the project's samples (samples/layers.py): MultiHeadAttention (heads) and FeedForward (neurons);
- Hugging Face Llama / Mistral / Qwen2 decoders: attention heads go in whole KV groups (one key/value head and
  the `num_key_value_groups` query heads that share it; G = those query heads' slice of o_proj's inputs), so
  the grouped-query layout stays regular; MLP neurons are rows of gate_proj / up_proj and columns of down_proj;
- Hugging Face BERT encoders: BertSelfAttention heads (query / key / value rows, BertSelfOutput.dense
  columns) and FFN neurons (BertIntermediate.dense rows, BertOutput.dense columns).
Checked against transformers 5.24: those forwards reshape with -1 and read only per-module `head_dim` /
`num_key_value_groups` (Llama) and `attention_head_size` (BERT), which pruning whole groups leaves unchanged;
module head counts (and, for the Llama family, the shared config, which can describe the result) are updated
so nothing disagrees with the shrunk weights. Any other model (GPT-2, Qwen3 / Gemma, whose extra norms and
scalings were not verified, an arbitrary nn.Module) is refused with a ValueError: structured_prunable() says
so from shapes alone, on a model built on the meta device."""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from passes.calibration import check_calibration_samples, excerpt, input_second_moments
from samples.layers import FeedForward, MultiHeadAttention

# Hugging Face classes whose forwards were read and whose pruned models were run (transformers 5.24)
GQA_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
BERT_ATTENTION_CLASSES = ("BertAttention",)
BERT_SELF_ATTENTION_CLASSES = ("BertSelfAttention",)
BERT_LAYER_CLASSES = ("BertLayer",)
KNOWN = ("the project's MultiHeadAttention / FeedForward, Hugging Face Llama / Mistral / Qwen2 attention and "
         "MLP, BERT self-attention and feed-forward")


@dataclass(frozen=True)
class StructuredPruneConfig:
    heads: float = 0.25  # fraction of attention heads (KV groups for grouped-query attention) removed per module
    ffn: float = 0.25  # fraction of FFN hidden neurons removed in each feed-forward block
    calibration_samples: int = 64

    def __post_init__(self):
        for field, value in (("heads", self.heads), ("ffn", self.ffn)):
            if isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"structured_prune.{field} must be in [0, 1), not {excerpt(value)}")
        check_calibration_samples("structured_prune", self.calibration_samples)

    needs_calibration = True

    def label(self) -> str:
        return f"heads-{self.heads:.0%}-ffn-{self.ffn:.0%}"


def _group_energy(weight: torch.Tensor, moment: torch.Tensor, groups: int) -> torch.Tensor:
    """Energy of each of `groups` equal slices of the input columns: trace(W_g H_gg W_gᵀ)."""
    size = weight.shape[1] // groups
    energies = []
    for g in range(groups):
        cols = slice(g * size, (g + 1) * size)
        w = weight[:, cols].double()
        energies.append(torch.einsum("ni,ij,nj->", w, moment[cols, cols], w))
    return torch.stack(energies)


def _block_energy(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The same energy from the diagonal blocks alone: blocks [G, w, w] of H, weight [N, G * w]."""
    groups, width, _ = blocks.shape
    w = weight.detach().double().reshape(weight.shape[0], groups, width)
    return torch.einsum("ngi,gij,ngj->g", w, blocks, w)


def _kept(energy: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = max(1, len(energy) - int(round(fraction * len(energy))))
    return torch.sort(torch.argsort(energy, descending=True, stable=True)[:keep]).values


def _shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    weight = linear.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    bias = None if linear.bias is None else (linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _slices(kept: torch.Tensor, width: int) -> torch.Tensor:
    """The indices of the kept groups' `width` consecutive channels each."""
    return torch.cat([torch.arange(g * width, (g + 1) * width) for g in kept.tolist()])


# --- the project's samples ---------------------------------------------------------------------------------

def _prune_heads(attention: MultiHeadAttention, energy: torch.Tensor, fraction: float) -> tuple[int, int]:
    kept = _kept(energy, fraction)
    rows = torch.cat([torch.arange(h * attention.head_dim, (h + 1) * attention.head_dim) for h in kept.tolist()])
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attention, name, _shrink_linear(getattr(attention, name), rows=rows))
    attention.out_proj = _shrink_linear(attention.out_proj, cols=rows)
    before, attention.heads = attention.heads, len(kept)
    return before, attention.heads


def _prune_neurons(ffn: FeedForward, energy: torch.Tensor, fraction: float) -> tuple[int, int]:
    kept = _kept(energy, fraction)
    before = ffn.fc_in.out_features
    ffn.fc_in = _shrink_linear(ffn.fc_in, rows=kept)
    ffn.fc_out = _shrink_linear(ffn.fc_out, cols=kept)
    return before, len(kept)


# --- Hugging Face units: each names its output projection, its groups and how to keep some of them ----------

def _linears(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class _GqaHeads:
    """Llama-family attention: groups are KV heads with their num_key_value_groups query heads."""
    kind = "heads"

    def __init__(self, attention: nn.Module):
        self.module = attention

    @staticmethod
    def problem(attention: nn.Module) -> str | None:
        extra = sorted(set(n for n, _ in attention.named_children()) - {"q_proj", "k_proj", "v_proj", "o_proj"})
        if extra:
            return f"submodules {', '.join(extra)} beside q/k/v/o_proj"
        if not _linears(attention, "q_proj", "k_proj", "v_proj", "o_proj"):
            return "q_proj / k_proj / v_proj / o_proj are not all nn.Linear"
        head_dim, groups = getattr(attention, "head_dim", None), getattr(attention, "num_key_value_groups", None)
        if not (_int(head_dim) and _int(groups)):
            return "no integer head_dim / num_key_value_groups"
        q, k, v, o = (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features,
                      attention.o_proj.in_features)
        if k != v or k % head_dim or q != o or q != k * groups:
            return f"q/k/v/o widths {q}/{k}/{v}/{o} do not fit head_dim {head_dim} x {groups} query heads per KV head"
        return None

    @property
    def projection(self) -> nn.Linear:
        return self.module.o_proj

    @property
    def groups(self) -> int:
        return self.module.k_proj.out_features // self.module.head_dim

    @property
    def width(self) -> int:
        return self.module.head_dim * self.module.num_key_value_groups

    def keep(self, kept: torch.Tensor) -> dict:
        attention, head_dim = self.module, self.module.head_dim
        kv_before, per_kv = self.groups, attention.num_key_value_groups
        query_rows, kv_rows = _slices(kept, self.width), _slices(kept, head_dim)
        attention.q_proj = _shrink_linear(attention.q_proj, rows=query_rows)
        attention.k_proj = _shrink_linear(attention.k_proj, rows=kv_rows)
        attention.v_proj = _shrink_linear(attention.v_proj, rows=kv_rows)
        attention.o_proj = _shrink_linear(attention.o_proj, cols=query_rows)
        # older transformers releases kept (and reshaped by) per-module head counts: keep any there are true
        if hasattr(attention, "num_heads"):
            attention.num_heads = len(kept) * per_kv
        if hasattr(attention, "num_key_value_heads"):
            attention.num_key_value_heads = len(kept)
        return {"before": kv_before * per_kv, "after": len(kept) * per_kv,
                "kv_heads": {"before": kv_before, "after": len(kept)}}

    def config_fields(self) -> dict:
        return {"head_dim": self.module.head_dim, "num_attention_heads": self.module.q_proj.out_features //
                self.module.head_dim, "num_key_value_heads": self.groups}


class _GatedMlp:
    """Llama-family MLP: down_proj(act(gate_proj(x)) * up_proj(x)); groups are single neurons."""
    kind = "ffn_neurons"
    width = 1

    def __init__(self, mlp: nn.Module):
        self.module = mlp

    @staticmethod
    def problem(mlp: nn.Module) -> str | None:
        extra = sorted(set(n for n, _ in mlp.named_children()) - {"gate_proj", "up_proj", "down_proj", "act_fn"})
        if extra:
            return f"submodules {', '.join(extra)} beside gate/up/down_proj"
        if not _linears(mlp, "gate_proj", "up_proj", "down_proj"):
            return "gate_proj / up_proj / down_proj are not all nn.Linear"
        if not mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features:
            return "gate_proj / up_proj / down_proj widths disagree"
        return None

    @property
    def projection(self) -> nn.Linear:
        return self.module.down_proj

    @property
    def groups(self) -> int:
        return self.module.down_proj.in_features

    def keep(self, kept: torch.Tensor) -> dict:
        mlp, before = self.module, self.groups
        mlp.gate_proj = _shrink_linear(mlp.gate_proj, rows=kept)
        mlp.up_proj = _shrink_linear(mlp.up_proj, rows=kept)
        mlp.down_proj = _shrink_linear(mlp.down_proj, cols=kept)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(kept)
        return {"before": before, "after": len(kept)}

    def config_fields(self) -> dict:
        return {"intermediate_size": self.groups}


class _BertHeads:
    """BertAttention: .self (query / key / value, num_attention_heads of attention_head_size) and .output.dense."""
    kind = "heads"

    def __init__(self, attention: nn.Module):
        self.module = attention

    @staticmethod
    def problem(attention: nn.Module) -> str | None:
        inner, output = getattr(attention, "self", None), getattr(attention, "output", None)
        if inner is None or not _linears(inner, "query", "key", "value") or output is None \
                or not _linears(output, "dense"):
            return "no .self query / key / value and .output.dense nn.Linear layers"
        heads, size = getattr(inner, "num_attention_heads", None), getattr(inner, "attention_head_size", None)
        if not (_int(heads) and _int(size)) or getattr(inner, "all_head_size", None) != heads * size:
            return "no consistent num_attention_heads / attention_head_size / all_head_size"
        widths = {inner.query.out_features, inner.key.out_features, inner.value.out_features,
                  output.dense.in_features}
        if widths != {heads * size}:
            return f"query / key / value / output widths {sorted(widths)} are not {heads} x {size}"
        return None

    @property
    def projection(self) -> nn.Linear:
        return self.module.output.dense

    @property
    def groups(self) -> int:
        return self.module.self.num_attention_heads

    @property
    def width(self) -> int:
        return self.module.self.attention_head_size

    def keep(self, kept: torch.Tensor) -> dict:
        inner, before = self.module.self, self.groups
        rows = _slices(kept, self.width)
        for name in ("query", "key", "value"):
            setattr(inner, name, _shrink_linear(getattr(inner, name), rows=rows))
        self.module.output.dense = _shrink_linear(self.module.output.dense, cols=rows)
        inner.num_attention_heads = len(kept)
        inner.all_head_size = len(kept) * inner.attention_head_size
        return {"before": before, "after": len(kept)}

    def config_fields(self) -> None:
        return None  # BertConfig derives the head size from hidden_size / num_attention_heads: it cannot say


class _BertFfn:
    """BertLayer: .intermediate.dense (then the activation) and .output.dense; groups are single neurons."""
    kind = "ffn_neurons"
    width = 1

    def __init__(self, layer: nn.Module):
        self.module = layer

    @staticmethod
    def problem(layer: nn.Module) -> str | None:
        intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        if intermediate is None or output is None or not _linears(intermediate, "dense") \
                or not _linears(output, "dense"):
            return "no .intermediate.dense and .output.dense nn.Linear layers"
        if intermediate.dense.out_features != output.dense.in_features:
            return "intermediate / output widths disagree"
        return None

    @property
    def projection(self) -> nn.Linear:
        return self.module.output.dense

    @property
    def groups(self) -> int:
        return self.module.output.dense.in_features

    def keep(self, kept: torch.Tensor) -> dict:
        before = self.groups
        self.module.intermediate.dense = _shrink_linear(self.module.intermediate.dense, rows=kept)
        self.module.output.dense = _shrink_linear(self.module.output.dense, cols=kept)
        return {"before": before, "after": len(kept)}

    def config_fields(self) -> None:
        return None  # BERT's heads cannot be described there either, so its config is left as it was


def _model_name(model: nn.Module) -> str:
    """The model's class, and the Hugging Face model inside a wrapper (CausalLMLogits (GPT2LMHeadModel))."""
    name = type(model).__name__
    if hasattr(getattr(model, "config", None), "model_type") and hasattr(model, "base_model_prefix"):
        return name  # a Hugging Face model itself, not a wrapper around one
    inner = next((m for m in model.modules() if m is not model and hasattr(getattr(m, "config", None),
                                                                               "model_type")), None)
    return f"{name} ({type(inner).__name__})" if inner is not None and type(inner) is not type(model) else name


def _find_units(model: nn.Module) -> tuple[str, list[tuple[str, object]], list[dict]]:
    """(family, [(module name, unit)], skipped) for the one family the model belongs to; ValueError for none, or
    for a module of a known class whose layout is not the one verified."""
    sample = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    sample += [(n, m) for n, m in model.named_modules() if isinstance(m, FeedForward)]
    attentions, ffns, skipped, problems = [], [], [], []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in GQA_ATTENTION_CLASSES:
            unit_type, into = _GqaHeads, attentions
        elif cls in GATED_MLP_CLASSES:
            unit_type, into = _GatedMlp, ffns
        elif cls in BERT_ATTENTION_CLASSES:
            inner = type(getattr(module, "self", None)).__name__
            if inner not in BERT_SELF_ATTENTION_CLASSES:
                skipped.append({"module": name, "reason": f"{inner} attention is not pruned"})
                continue
            unit_type, into = _BertHeads, attentions
        elif cls in BERT_LAYER_CLASSES:
            unit_type, into = _BertFfn, ffns
        else:
            continue
        problem = unit_type.problem(module)
        if problem:
            problems.append(f"{name or cls} ({cls}): {problem}")
        else:
            into.append((name, unit_type(module)))
    if problems:
        raise ValueError(f"{_model_name(model)} does not have the layout structured pruning was verified on: "
                         f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}")
    hf = attentions + ffns
    if sample and hf:
        raise ValueError(f"{_model_name(model)} mixes the project's sample layers with Hugging Face ones")
    if not sample and not hf:
        raise ValueError(f"{_model_name(model)} has no attention heads or FFN neurons structured pruning knows "
                         f"how to remove (it knows {KNOWN})")
    return ("samples", sample, skipped) if sample else ("hf", hf, skipped)


def _kind(unit) -> str:
    if isinstance(unit, MultiHeadAttention):
        return "heads"
    if isinstance(unit, FeedForward):
        return "ffn_neurons"
    return unit.kind


def structured_prunable(model: nn.Module, config: StructuredPruneConfig | None = None) -> list[tuple[str, str]]:
    """[(module name, "heads" | "ffn_neurons")] the pass would shrink. Shapes only: works on a model on the meta
    device (recipe checks before weights load); ValueError naming the model class when it has no structure the
    pass knows."""
    return [(name, _kind(unit)) for name, unit in _find_units(model)[1]]


# --- calibration ---------------------------------------------------------------------------------------------

def _token_mask(batch: tuple) -> torch.Tensor | None:
    """An attention mask in the batch ((input_ids, attention_mask), as encoders take it): padding tokens'
    activations are left out of the statistics (nothing downstream reads them)."""
    if len(batch) < 2 or not all(isinstance(t, torch.Tensor) for t in batch[:2]):
        return None
    ids, mask = batch[0], batch[1]
    if mask.shape != ids.shape or mask.dim() != 2 or mask.is_floating_point():
        return None
    return mask.bool() if bool(((mask == 0) | (mask == 1)).all()) else None


@torch.no_grad()
def _block_moments(model: nn.Module, units: list, calibration: list[tuple]) -> list[torch.Tensor]:
    """For each unit, the diagonal blocks [groups, width, width] (float64) of H = Σ x xᵀ over the calibration
    tokens of its output projection's inputs: all the energy needs, without the full [K, K] matrix."""
    moments = [torch.zeros(u.groups, u.width, u.width, dtype=torch.float64) for u in units]
    state = {"mask": None}

    def hook_for(index: int, unit):
        def hook(_, inputs, __):
            x, mask = inputs[0], state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.to(x.device)]
            x = x.reshape(-1, unit.groups, unit.width).double()
            if unit.width == 1:
                moments[index].add_(x.square().sum(0)[:, :, None])
            else:
                moments[index].add_(torch.einsum("ngi,ngj->gij", x, x))
        return hook

    handles = [u.projection.register_forward_hook(hook_for(i, u)) for i, u in enumerate(units)]
    try:
        for batch in calibration:
            state["mask"] = _token_mask(batch)
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _update_configs(units: list) -> None:
    """Where all units sharing one config object (one model's layers) now agree on a field the config can
    state, the config says so too (a saved and reloaded model, a sized cache, see the shrunk shapes); head_dim
    is written explicitly first, since configs otherwise derive it from hidden_size / num_attention_heads."""
    shared: dict[int, tuple[object, dict[str, set]]] = {}
    for unit in units:
        fields, config = unit.config_fields(), getattr(unit.module, "config", None)
        if not fields or config is None:
            continue
        values = shared.setdefault(id(config), (config, {}))[1]
        for key, value in fields.items():
            values.setdefault(key, set()).add(value)
    for config, values in shared.values():
        agreed = {key: next(iter(v)) for key, v in values.items() if len(v) == 1}
        if "num_attention_heads" in agreed and "head_dim" not in agreed:
            agreed = {k: v for k, v in agreed.items() if k not in ("num_attention_heads", "num_key_value_heads")}
        for key in ("head_dim", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if key in agreed:
                setattr(config, key, agreed[key])


# --- the pass ------------------------------------------------------------------------------------------------

def _prune_samples(model: nn.Module, config: StructuredPruneConfig, calibration: list[tuple],
                   units: list) -> list[dict]:
    """The sample family, exactly as before this module knew other families (full second moments)."""
    attentions = [(n, m) for n, m in units if isinstance(m, MultiHeadAttention)]
    ffns = [(n, m) for n, m in units if isinstance(m, FeedForward)]
    projections = [m.out_proj for _, m in attentions] + [m.fc_out for _, m in ffns]
    moments = input_second_moments(model, projections, calibration)
    layers = []
    for (name, attention), moment in zip(attentions, moments[: len(attentions)]):
        energy = _group_energy(attention.out_proj.weight, moment, attention.heads)
        before, after = _prune_heads(attention, energy, config.heads)
        layers.append({"module": name, "kind": "heads", "before": before, "after": after})
    for (name, ffn), moment in zip(ffns, moments[len(attentions):]):
        energy = _group_energy(ffn.fc_out.weight, moment, ffn.fc_out.in_features)
        before, after = _prune_neurons(ffn, energy, config.ffn)
        layers.append({"module": name, "kind": "ffn_neurons", "before": before, "after": after})
    return layers


def _prune_hf(model: nn.Module, config: StructuredPruneConfig, calibration: list[tuple], units: list) -> list[dict]:
    moments = _block_moments(model, [u for _, u in units], calibration)
    layers = []
    for (name, unit), blocks in zip(units, moments):
        energy = _block_energy(unit.projection.weight, blocks)
        fraction = config.heads if unit.kind == "heads" else config.ffn
        layers.append({"module": name, "kind": unit.kind, **unit.keep(_kept(energy, fraction))})
    _update_configs([u for _, u in units])
    return layers


@torch.no_grad()
def structured_prune_model(model: nn.Module, config: StructuredPruneConfig, calibration: list[tuple] | None,
                           progress: bool = False) -> dict:
    family, units, skipped = _find_units(model)  # ValueError first: an unknown model is refused before any work
    if not calibration:
        raise ValueError("structured_prune needs calibration batches and none were given")
    params_before = sum(p.numel() for p in model.parameters())
    prune = _prune_samples if family == "samples" else _prune_hf
    layers = prune(model, config, calibration, units)
    params = sum(p.numel() for p in model.parameters())
    return {"name": "structured_prune", "config": asdict(config), "label": config.label(), "layers": layers,
            "skipped": skipped, "params_before": params_before, "params": params}

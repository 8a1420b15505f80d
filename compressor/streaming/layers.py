"""One decoder layer (or the model's ends: embedding, final norm, head) as a torch module of its own, built from
its tensors alone, under the module names it has in the whole model (`decoder.model.layers.N.self_attn.q_proj`,
as compressor.inputs.hf_models.CausalLMLogits names them), so that every torch pass runs on it unchanged: a pass
calls model(*batch) on calibration batches, which here are the hidden states that reach the layer."""
import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressor.errors import UserError
from compressor.inputs.decoders import HF_ACTIVATIONS, HF_FAMILIES, hf_layer, linear_chain, rms_norm
from exporters.decoder_graph import Decoder, DecoderLayer

PREFIX = "decoder.model"


@dataclass
class Family:
    """The transformers classes one config builds, found on a one-layer model on the meta device."""
    config: object  # transformers PretrainedConfig
    layer_class: type
    norm_class: type
    rotary: nn.Module  # the rotary embedding (its inv_freq: small), on the CPU
    activation: str  # exporters.decoder_graph.ACTIVATIONS

    @property
    def layers(self) -> int:
        return int(self.config.num_hidden_layers)


def family_of(config) -> Family:
    """UserError for a config the streamed path cannot take (one line, saying what to do)."""
    import transformers

    model_type = getattr(config, "model_type", None)
    if model_type not in HF_FAMILIES:
        raise UserError(f"streamed runs take {', '.join(HF_FAMILIES)} decoders, not model_type {model_type!r}")
    activation = HF_ACTIVATIONS.get(getattr(config, "hidden_act", ""))
    if activation is None:
        raise UserError(f"hidden_act {getattr(config, 'hidden_act', None)!r} has no fused ONNX form here")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise UserError("Mistral with a sliding window is not exported with a KV cache, so it cannot be streamed")
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"  # one plain softmax(QKᵀ)V, as the whole-model path runs it
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(small)
    rotary = type(meta.model.rotary_emb)(config=config)  # its inv_freq, computed on the CPU
    head_dim = getattr(meta.model.layers[0].self_attn, "head_dim", 0)
    if 2 * len(rotary.inv_freq) != head_dim or head_dim % 16:
        raise UserError(f"head_dim {head_dim} with {len(rotary.inv_freq)} rotary frequencies: GroupQueryAttention "
                        f"takes whole-head rotary embeddings and head sizes that are multiples of 16")
    return Family(config, type(meta.model.layers[0]), type(meta.model.norm), rotary, activation)


def _built(build, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module built on the meta device, then given `tensors` (fp32) as its parameters: no random init, no copy."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return module.eval()


def _container(**children: nn.Module) -> nn.Module:
    parent = nn.Module()
    for name, child in children.items():
        setattr(parent, name, child)
    return parent


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


class LayerModel(nn.Module):
    """Decoder layer `index` alone: forward(hidden [batch, sequence, width]) -> its output hidden states, for
    full windows (no padding: the causal mask only), positions 0..sequence-1."""

    def __init__(self, family: Family, index: int, tensors: dict[str, torch.Tensor]):
        super().__init__()
        config = copy.deepcopy(family.config)  # its own: structured pruning writes the layer's new sizes into it
        layer = _built(lambda: family.layer_class(config, index), tensors)
        self.decoder = _container(model=_container(layers=nn.ModuleDict({str(index): layer})))
        self.config = self.decoder.config = config
        self.index = index
        self._rotary = [family.rotary]  # in a list: not a submodule (no parameters, not the passes' to see)

    @property
    def layer(self) -> nn.Module:
        return self.decoder.model.layers[str(self.index)]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        positions = torch.arange(length).expand(batch, length)
        embeddings = self._rotary[0](hidden, positions)
        out = self.layer(hidden, attention_mask=_causal_mask(length, hidden.dtype), position_ids=positions,
                         position_embeddings=embeddings)
        return out[0] if isinstance(out, tuple) else out

    def describe(self, activation: str) -> DecoderLayer:
        """The layer as exporters.decoder_graph writes it (after whatever the passes did to it)."""
        described = hf_layer(self.layer, f"{PREFIX}.layers.{self.index}", activation)
        if described is None:
            raise UserError(f"layer {self.index}: after the passes it is no longer a layer the decoder graph takes")
        return described


class EndsModel(nn.Module):
    """The model's ends as the whole model names them: the token table (`embed`), the final norm and the LM head
    (`lm_head`; `tied`: the table itself). A streamed run holds them as one or two parts: a tied model's table and
    head together, else the table alone first and the norm and head alone last. forward(hidden after the last
    layer) -> logits."""

    def __init__(self, family: Family, embed: torch.Tensor | None, norm: torch.Tensor | None,
                 lm_head: torch.Tensor | None, tied: bool = False):
        super().__init__()
        config = family.config
        model, decoder = nn.Module(), nn.Module()
        if embed is not None:
            model.embed_tokens = nn.Embedding(*embed.shape, device="meta")
            model.embed_tokens.weight = nn.Parameter(embed.float(), requires_grad=False)
        if norm is not None:
            model.norm = _built(lambda: family.norm_class(config.hidden_size, eps=config.rms_norm_eps),
                                {"weight": norm})
        decoder.model = model
        if tied or lm_head is not None:
            head = nn.Linear(config.hidden_size, int(config.vocab_size), bias=False, device="meta")
            head.weight = model.embed_tokens.weight if tied else nn.Parameter(lm_head.float(), requires_grad=False)
            decoder.lm_head = head
        self.decoder = decoder
        self.config = self.decoder.config = config
        self.tied = tied

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.lm_head(self.decoder.model.norm(hidden))

    def describe(self, family: Family) -> Decoder:
        """The ends as exporters.decoder_graph writes them (no layers: those are written one by one); what this
        part does not hold is described by name only."""
        model, config = self.decoder.model, family.config
        table = getattr(model, "embed_tokens", None)
        head = getattr(self.decoder, "lm_head", None)
        return Decoder(vocab_size=int(config.vocab_size), max_positions=int(config.max_position_embeddings),
                       embed_name=f"{PREFIX}.embed_tokens.weight",
                       embed=table.weight.detach().numpy() if table is not None else np.zeros((1, 1), np.float32),
                       layers=[], final_norm=rms_norm(model.norm, f"{PREFIX}.norm") if hasattr(model, "norm") else None,
                       lm_head=None if self.tied or head is None else linear_chain(head, "decoder.lm_head"),
                       rotary_inv_freq=family.rotary.inv_freq.float().numpy(),
                       rotary_scaling=float(getattr(family.rotary, "attention_scaling", 1.0)))

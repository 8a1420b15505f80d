"""The torch decoders we can write as a KV-cache graph (exporters.decoder_graph), described from their modules.

Shapes come from the weights, not the configs, so a structurally pruned model (fewer heads, KV groups or FFN
neurons) and a low-rank one (a Linear replaced by passes.lowrank.LowRankLinear: down then up) describe
themselves. Taken: the project's GPT samples (learned positions, LayerNorm, GELU) and Hugging Face Llama,
Mistral (no sliding window) and Qwen2 decoders (rotary embeddings, RMSNorm, SwiGLU, grouped-query attention).
Anything else, and heads whose size is not a multiple of 16 (GroupQueryAttention's kernels need that), returns
None and is exported as a full-sequence forward without a cache.
"""
import numpy as np
from torch import nn

from exporters.decoder_graph import Decoder, DecoderLayer, Linear, Norm

HF_FAMILIES = ("llama", "mistral", "qwen2")
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _array(tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()


def linear_chain(module: nn.Module, name: str) -> list[Linear] | None:
    """A Linear, or a low-rank pair, as the MatMul chain the graph computes; None for anything else."""
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else _array(module.bias)
        return [Linear(name, _array(module.weight), bias)]
    if type(module).__name__ == "LowRankLinear":
        return linear_chain(module.down, f"{name}.down") + linear_chain(module.up, f"{name}.up")
    return None


def _out_features(chain: list[Linear]) -> int:
    return chain[-1].weight.shape[0]


def _chains(parent: nn.Module, prefix: str, names: dict[str, str]) -> dict[str, list[Linear]] | None:
    chains = {key: linear_chain(getattr(parent, attr, None), f"{prefix}.{attr}") for key, attr in names.items()}
    return None if any(chain is None for chain in chains.values()) else chains


def _layer_norm(module: nn.Module, name: str) -> Norm | None:
    if not isinstance(module, nn.LayerNorm) or module.weight is None:
        return None
    bias = np.zeros(module.weight.shape, np.float32) if module.bias is None else _array(module.bias)
    return Norm(name, _array(module.weight), bias, float(module.eps))


def rms_norm(module: nn.Module, name: str) -> Norm | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if getattr(module, "weight", None) is None or eps is None:
        return None
    return Norm(name, _array(module.weight), None, float(eps))


def gpt_decoder(model: nn.Module) -> Decoder | None:
    """samples.gpt.GPT (its attention heads may have been pruned)."""
    if type(model).__name__ != "GPT":
        return None
    layers = []
    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}"
        attn = _chains(block.attn, f"{prefix}.attn", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"})
        mlp = _chains(block.mlp, f"{prefix}.mlp", {"up": "fc_in", "down": "fc_out"})
        norms = _layer_norm(block.ln_attn, f"{prefix}.ln_attn"), _layer_norm(block.ln_mlp, f"{prefix}.ln_mlp")
        activation = type(block.mlp.activation).__name__.lower()
        if attn is None or mlp is None or None in norms or activation not in ("gelu", "relu"):
            return None
        if activation == "gelu" and getattr(block.mlp.activation, "approximate", "none") != "none":
            activation = "gelu_tanh"
        head_dim = block.attn.head_dim
        layers.append(DecoderLayer(attn_norm=norms[0], mlp_norm=norms[1], mlp=mlp, activation=activation,
                                   heads=_out_features(attn["q"]) // head_dim,
                                   kv_heads=_out_features(attn["k"]) // head_dim, head_dim=head_dim,
                                   **{key: attn[key] for key in "qkvo"}))
    final_norm, lm_head = _layer_norm(model.ln_final, "ln_final"), linear_chain(model.lm_head, "lm_head")
    if final_norm is None or lm_head is None:
        return None
    tied = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.token_emb.weight
    return Decoder(vocab_size=model.token_emb.num_embeddings, max_positions=model.pos_emb.num_embeddings,
                   embed_name="token_emb.weight", embed=_array(model.token_emb.weight), layers=layers,
                   final_norm=final_norm, lm_head=None if tied else lm_head, positions=_array(model.pos_emb.weight),
                   positions_name="pos_emb.weight")


def hf_decoder(wrapper: nn.Module) -> Decoder | None:
    """compressor.inputs.hf_models.CausalLMLogits around a Llama / Mistral / Qwen2 model."""
    lm = getattr(wrapper, "decoder", None)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in HF_FAMILIES:
        return None
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.model_type == "mistral":
        return None  # GroupQueryAttention's local window differs in detail; not exported with a cache
    activation = HF_ACTIVATIONS.get(getattr(config, "hidden_act", ""))
    inner = lm.model
    rotary = getattr(inner, "rotary_emb", None)
    if activation is None or rotary is None or getattr(rotary, "inv_freq", None) is None:
        return None
    layers = []
    for index, block in enumerate(inner.layers):
        layer = hf_layer(block, f"decoder.model.layers.{index}", activation)
        if layer is None:
            return None
        layers.append(layer)
    if 2 * len(rotary.inv_freq) != layers[0].head_dim:
        return None  # partial rotary: GroupQueryAttention rotates the whole head
    final_norm = rms_norm(inner.norm, "decoder.model.norm")
    tied = isinstance(lm.lm_head, nn.Linear) and lm.lm_head.weight is inner.embed_tokens.weight
    lm_head = None if tied else linear_chain(lm.lm_head, "decoder.lm_head")
    if final_norm is None or (lm_head is None and not tied):
        return None
    return Decoder(vocab_size=inner.embed_tokens.num_embeddings, max_positions=int(config.max_position_embeddings),
                   embed_name="decoder.model.embed_tokens.weight", embed=_array(inner.embed_tokens.weight),
                   layers=layers, final_norm=final_norm, lm_head=lm_head, rotary_inv_freq=_array(rotary.inv_freq),
                   rotary_scaling=float(getattr(rotary, "attention_scaling", 1.0)))


def hf_layer(block: nn.Module, prefix: str, activation: str) -> DecoderLayer | None:
    """One Llama / Mistral / Qwen2 decoder layer (`prefix`: its module path in the whole model)."""
    attn = _chains(block.self_attn, f"{prefix}.self_attn", {k: f"{k}_proj" for k in "qkvo"})
    mlp = _chains(block.mlp, f"{prefix}.mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    norms = (rms_norm(block.input_layernorm, f"{prefix}.input_layernorm"),
             rms_norm(block.post_attention_layernorm, f"{prefix}.post_attention_layernorm"))
    head_dim = getattr(block.self_attn, "head_dim", None)
    if attn is None or mlp is None or None in norms or not head_dim:
        return None
    if _out_features(attn["q"]) % head_dim or _out_features(attn["k"]) % head_dim:
        return None
    return DecoderLayer(attn_norm=norms[0], mlp_norm=norms[1], mlp=mlp, activation=activation,
                        heads=_out_features(attn["q"]) // head_dim, kv_heads=_out_features(attn["k"]) // head_dim,
                        head_dim=head_dim, **{key: attn[key] for key in "qkvo"})


def is_decoder(model: nn.Module) -> bool:
    """Whether the model is of a kind as_decoder describes (without copying its weights)."""
    config = getattr(getattr(model, "decoder", None), "config", None)
    return type(model).__name__ == "GPT" or getattr(config, "model_type", None) in HF_FAMILIES


def as_decoder(model: nn.Module) -> Decoder | None:
    decoder = gpt_decoder(model) or hf_decoder(model)
    if decoder is None or any(layer.head_dim % 16 for layer in decoder.layers):
        return None  # ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 16 only
    return decoder

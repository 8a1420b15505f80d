"""The KV-cache decoder graph (exporters.decoder_graph) against the torch models it describes: the full sequence
(a prefill with empty pasts), the same positions decoded one token at a time through the cache, and greedy
generation. Tolerance: fp32 kernels that differ only in summation order (1e-4 normwise, as validate's)."""
import numpy as np
import onnx
import pytest
import torch

from compressor.generation import generate
from compressor.inputs.checkpoint import load_checkpoint
from compressor.inputs.decoders import as_decoder, is_decoder
from compressor.ort_runtime import create_session, logits_fn
from compressor.validate import cached_logits, parity
from exporters.decoder_graph import build_decoder_graph

TOLERANCE = 1e-4


def _session(model):
    proto = build_decoder_graph(as_decoder(model))
    onnx.checker.check_model(proto)
    return create_session(proto.SerializeToString())


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).float().numpy()


def _check_against_torch(model, vocab: int, length: int = 24, steps: int = 6):
    ids = np.random.default_rng(0).integers(0, vocab, (3, length))
    session = _session(model)
    reference = _torch_logits(model, ids)
    full = parity(reference, logits_fn(session)({"input_ids": ids}), TOLERANCE)
    decoded = parity(reference[:, -steps:], cached_logits(session, ids, steps), TOLERANCE)
    assert full["passed"] and decoded["passed"], (full, decoded)
    return session


def _torch_greedy(model, prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(_torch_logits(model, np.asarray([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_gpt_sample_cache_graph_matches_torch_and_generates_the_same_tokens(shipped):
    model = load_checkpoint(shipped / "gpt-xs").model.eval()
    session = _check_against_torch(model, 256)
    prompt = list("The river ".encode())
    ours = generate(session, prompt, 32).tokens
    assert ours == _torch_greedy(model, prompt, 32)


def test_pruned_and_low_rank_gpt_describe_themselves(shipped):
    from passes.lowrank import LowRankConfig, lowrank_model
    from passes.structured_prune import StructuredPruneConfig, structured_prune_model

    from compressor.tasks import language_modeling

    checkpoint = load_checkpoint(shipped / "gpt-xs")
    model = checkpoint.model.eval()
    calibration = language_modeling.calibration_data(checkpoint.config, 16)
    structured_prune_model(model, StructuredPruneConfig(heads=0.5, ffn=0.25), calibration)
    lowrank_model(model, LowRankConfig(rank_ratio=None, param_budget=0.5))
    decoder = as_decoder(model)
    assert decoder.layers[0].heads == model.blocks[0].attn.heads < 4
    assert any(len(chain) == 2 for layer in decoder.layers for chain in (layer.q, layer.mlp["up"]))  # low-rank pairs
    _check_against_torch(model, 256)


def _hf(kind: str, **overrides):
    transformers = pytest.importorskip("transformers")
    from compressor.inputs.hf_models import CausalLMLogits

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=256)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    inner = model_class(config_class(**{**common, **overrides}))
    inner.config._attn_implementation = "eager"
    return CausalLMLogits(inner.eval()).eval()


@pytest.mark.parametrize("kind, overrides", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False, "rope_theta": 500000.0}),
    ("qwen2", {"tie_word_embeddings": False}),  # q/k/v biases
])
def test_hf_decoders_match_torch_through_the_cache(kind, overrides):
    model = _hf(kind, **overrides)
    if kind == "qwen2":  # random init leaves biases zero; make them count
        for layer in model.decoder.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    decoder = as_decoder(model)
    assert (decoder.layers[0].heads, decoder.layers[0].kv_heads) == (4, 2)  # grouped-query attention kept
    assert (decoder.lm_head is None) == overrides["tie_word_embeddings"]
    _check_against_torch(model, 300)


def test_models_without_a_cache_layout_are_not_described():
    transformers = pytest.importorskip("transformers")
    from compressor.inputs.hf_models import CausalLMLogits

    gpt2 = CausalLMLogits(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)))
    assert not is_decoder(gpt2) and as_decoder(gpt2) is None
    assert as_decoder(torch.nn.Linear(2, 2)) is None

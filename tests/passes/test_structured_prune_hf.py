"""Structured pruning of Hugging Face models: Llama-family attention in whole KV groups and gated MLP neurons,
BERT heads and FFN neurons, on tiny random models; the shape-only selection refuses what it does not know."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from compressor.inputs.hf_models import CausalLMLogits, SentenceEmbedder  # noqa: E402
from passes.structured_prune import StructuredPruneConfig, structured_prunable, structured_prune_model  # noqa: E402

VOCAB = 400
DECODERS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def _decoder_config(family: str = "llama"):
    config_type, _ = DECODERS[family]
    return config_type(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=192, max_position_embeddings=128,
                       tie_word_embeddings=True, attn_implementation="eager")


def _decoder(family: str = "llama") -> CausalLMLogits:
    torch.manual_seed(0)
    model = CausalLMLogits(DECODERS[family][1](_decoder_config(family)))
    return model.eval()


def _bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")


def _bert() -> SentenceEmbedder:
    torch.manual_seed(0)
    return SentenceEmbedder(transformers.BertModel(_bert_config())).eval()


def _tokens(seed: int, batches: int = 2, shape=(2, 16)) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, shape, generator=generator),) for _ in range(batches)]


def _padded(seed: int) -> list[tuple]:
    """(input_ids, attention_mask) batches, the second row of each padded after 9 tokens."""
    batches = []
    for (ids,) in _tokens(seed):
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        batches.append((ids, mask))
    return batches


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_kv_groups_and_neurons_shrink_exactly(family, tmp_path):
    model = _decoder(family)
    before = _params(model)
    record = structured_prune_model(model, StructuredPruneConfig(heads=0.5, ffn=0.25), _tokens(1))
    for layer in model.decoder.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert attention.q_proj.out_features == 48 and attention.o_proj.in_features == 48
        assert attention.k_proj.out_features == attention.v_proj.out_features == 24
        assert attention.head_dim == 24 and attention.num_key_value_groups == 2
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 144
        assert mlp.intermediate_size == 144
    # per layer: q 48 rows, k and v 24 rows each, o 48 columns of width 96; gate / up 48 rows, down 48 columns
    removed = 2 * (96 * (48 + 24 + 24 + 48) + 3 * 96 * 48)
    if family == "qwen2":
        removed += 2 * (48 + 24 + 24)  # q / k / v biases
    assert record["params_before"] == before and record["params"] == before - removed == _params(model)
    assert record["layers"] == [
        *({"module": f"decoder.model.layers.{i}.self_attn", "kind": "heads", "before": 4, "after": 2,
           "kv_heads": {"before": 2, "after": 1}} for i in range(2)),
        *({"module": f"decoder.model.layers.{i}.mlp", "kind": "ffn_neurons", "before": 192, "after": 144}
          for i in range(2))]
    config = model.decoder.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) \
        == (2, 1, 24, 144)
    ids = _tokens(2, 1, (3, 20))[0][0]
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (3, 20, VOCAB) and torch.isfinite(logits).all()
    # the updated config describes the pruned model: it saves and reloads to the same logits
    model.decoder.save_pretrained(tmp_path)
    reloaded = CausalLMLogits(DECODERS[family][1].from_pretrained(tmp_path, attn_implementation="eager")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids), logits, atol=1e-5)


def test_bert_heads_and_neurons_shrink_exactly():
    model = _bert()
    before = _params(model)
    record = structured_prune_model(model, StructuredPruneConfig(heads=0.5, ffn=0.25), _padded(1))
    for layer in model.encoder.encoder.layer:
        inner = layer.attention.self
        assert inner.query.out_features == inner.key.out_features == inner.value.out_features == 32
        assert layer.attention.output.dense.in_features == 32
        assert (inner.num_attention_heads, inner.attention_head_size, inner.all_head_size) == (2, 16, 32)
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 96
    removed = 2 * (3 * (32 * 64 + 32) + 64 * 32 + (32 * 64 + 32) + 64 * 32)
    assert record["params"] == before - removed == _params(model)
    assert [(layer["kind"], layer["before"], layer["after"]) for layer in record["layers"]] == \
        [("heads", 4, 2)] * 2 + [("ffn_neurons", 128, 96)] * 2
    ids, mask = _padded(2)[0]
    with torch.no_grad():
        embeddings = model(ids, mask)
    assert embeddings.shape == (2, 64) and torch.isfinite(embeddings).all()


@pytest.mark.parametrize("build, calibration", [(_decoder, _tokens), (_bert, _padded)], ids=["llama", "bert"])
def test_nothing_removed_leaves_outputs_unchanged(build, calibration):
    model = build()
    reference = copy.deepcopy(model)
    record = structured_prune_model(model, StructuredPruneConfig(heads=0, ffn=0), calibration(1))
    assert record["params"] == record["params_before"] == _params(reference)
    assert all(layer["before"] == layer["after"] for layer in record["layers"])
    inputs = calibration(3)[0]
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference(*inputs))


def test_the_group_without_energy_is_the_one_removed():
    model = _decoder()
    layers = model.decoder.model.layers
    original = [(layer.self_attn.k_proj.weight.clone(), layer.mlp.up_proj.weight.clone()) for layer in layers]
    dead = {0: 0, 1: 1}  # layer -> the KV group whose query heads' o_proj slice is zeroed
    with torch.no_grad():
        for index, group in dead.items():
            layers[index].self_attn.o_proj.weight[:, group * 48:(group + 1) * 48] = 0
            layers[index].mlp.down_proj.weight[:, :48] = 0  # neurons 0..47: no energy at down_proj
    structured_prune_model(model, StructuredPruneConfig(heads=0.5, ffn=0.25), _tokens(1))
    for index, group in dead.items():
        live = 1 - group
        k_weight, up_weight = original[index]
        assert torch.equal(layers[index].self_attn.k_proj.weight, k_weight[live * 24:(live + 1) * 24])
        assert torch.equal(layers[index].mlp.up_proj.weight, up_weight[48:])


def test_padding_tokens_do_not_steer_the_choice():
    """Encoder statistics count real tokens only: what sits under attention_mask == 0 changes nothing."""
    calibration = _padded(1)
    other = [(torch.where(mask.bool(), ids, (ids * 7 + 3) % VOCAB), mask) for ids, mask in calibration]
    first, second = _bert(), _bert()
    structured_prune_model(first, StructuredPruneConfig(heads=0.5, ffn=0.5), calibration)
    structured_prune_model(second, StructuredPruneConfig(heads=0.5, ffn=0.5), other)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_selection_from_shapes_on_the_meta_device():
    with torch.device("meta"):
        llama = CausalLMLogits(transformers.LlamaForCausalLM(_decoder_config()))
        bert = SentenceEmbedder(transformers.BertModel(_bert_config()))
    config = StructuredPruneConfig()
    assert structured_prunable(llama, config) == [
        ("decoder.model.layers.0.self_attn", "heads"), ("decoder.model.layers.1.self_attn", "heads"),
        ("decoder.model.layers.0.mlp", "ffn_neurons"), ("decoder.model.layers.1.mlp", "ffn_neurons")]
    assert structured_prunable(bert, config) == [
        ("encoder.encoder.layer.0.attention", "heads"), ("encoder.encoder.layer.1.attention", "heads"),
        ("encoder.encoder.layer.0", "ffn_neurons"), ("encoder.encoder.layer.1", "ffn_neurons")]


def _gpt2():
    return CausalLMLogits(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)))


def _qwen3():
    return CausalLMLogits(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, head_dim=16)))


@pytest.mark.parametrize("build, named", [(_gpt2, "CausalLMLogits (GPT2LMHeadModel)"),
                                          (_qwen3, "CausalLMLogits (Qwen3ForCausalLM)"),
                                          (lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU()), "Sequential")],
                         ids=["gpt2", "qwen3", "sequential"])
def test_unknown_structures_are_refused(build, named):
    with torch.device("meta"):
        skeleton = build()
    with pytest.raises(ValueError, match="no attention heads or FFN neurons") as refused:
        structured_prunable(skeleton, StructuredPruneConfig())
    assert named in str(refused.value)
    torch.manual_seed(0)
    model = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as pruning:
        structured_prune_model(model, StructuredPruneConfig(), [(torch.randint(0, 8, (1, 8)),)])
    assert str(pruning.value) == str(refused.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_known_class_with_an_unverified_layout_is_refused():
    with torch.device("meta"):
        model = CausalLMLogits(transformers.LlamaForCausalLM(_decoder_config()))
    model.decoder.model.layers[1].self_attn.q_norm = nn.LayerNorm(24)  # as Qwen3 has: not what was verified
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn \(LlamaAttention\): submodules q_norm"):
        structured_prunable(model, StructuredPruneConfig())

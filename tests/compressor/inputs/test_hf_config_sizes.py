"""Sizes a Hugging Face config or a GGUF's metadata states that drive an allocation no weight bounds: a decoder's
position limit (its rotary tables at export, every length after), the buffers a model builds. Each is refused
before the model is built, in one line naming the value and its limit."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compressor.errors import UserError  # noqa: E402
from compressor.inputs.hf import MAX_BUFFER_BYTES, _check_allocations, hf_model_skeleton  # noqa: E402
from compressor.inputs.onnx import MAX_POSITIONS  # noqa: E402
from exporters.decoder_graph import max_rotary_positions  # noqa: E402
from hf_files import copy_folder, write_gguf  # noqa: E402


def test_max_position_embeddings_past_the_limit_exits_2_before_any_work(compress_here, tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama, tmp_path, max_position_embeddings=10**8)
    done = compress_here("run", str(folder), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 2
    assert done.stderr == (f"error: {folder}/config.json: max_position_embeddings must be an integer in "
                           f"1..{MAX_POSITIONS:,}, not 100000000\n")
    assert not (tmp_path / "out").exists()


def test_rotary_tables_past_their_bound_are_refused_from_the_config(tmp_path):
    """Head size 128: 1 GiB of cos and sin tables holds 2,097,152 positions (a 1M-context config fits)."""
    assert max_rotary_positions(64) == 2_097_152
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=1_010_000)
    config.save_pretrained(str(tmp_path))
    hf_model_skeleton(tmp_path)  # no weights yet: the loader says so; the config itself is fine
    config.max_position_embeddings = 4_000_000
    config.save_pretrained(str(tmp_path))
    with pytest.raises(UserError) as error:
        hf_model_skeleton(tmp_path)
    assert str(error.value) == (f"{tmp_path}/config.json: max_position_embeddings 4,000,000 needs rotary tables of "
                                f"1.91 GiB at export; at most 2,097,152 positions at head_dim 128 (1 GiB)")


def test_a_gguf_context_length_past_the_limit_is_refused(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_llama, tmp_path / "model.gguf", context=10**8)
    with pytest.raises(UserError) as error:
        hf_model_skeleton(path)
    assert str(error.value) == (f"{path} (its metadata): max_position_embeddings must be an integer in "
                                f"1..{MAX_POSITIONS:,}, not 100000000")


def test_buffers_a_config_sizes_are_counted():
    """The parameter count (checked against the weights' bytes) does not see buffers: a model whose buffers
    follow a config value is refused above MAX_BUFFER_BYTES."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    _check_allocations(model, "where")
    with torch.device("meta"):
        model.model.register_buffer("mask", torch.empty(1, 1, 2**16, 2**15, dtype=torch.bool), persistent=False)
    with pytest.raises(UserError, match=rf"^where implies buffers of 2\.00 GiB \(model\.mask \(1, 1, 65536, 32768\)\); "
                                        rf"at most {MAX_BUFFER_BYTES / 2**30:g} GiB$"):
        _check_allocations(model, "where")

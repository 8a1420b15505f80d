"""Weights that do not fill the model their config describes are refused, from the weights' headers, before any
weight loads (Hugging Face folders and GGUF files): transformers would initialise a missing tensor at random, drop
one the config does not name and cast integer tensors to float, and the run would measure that model against
itself. The differences transformers handles on purpose (a tied lm_head, buffers it does not save, a task
checkpoint's head under a base model, the pooler the sentence embedder drops) are accepted."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from safetensors.torch import load_file, save_file  # noqa: E402

from compressor.errors import UserError  # noqa: E402
from compressor.inputs.hf import hf_model_skeleton, load_hf_checkpoint  # noqa: E402
from hf_files import copy_folder, edit_config, edit_state, write_gguf  # noqa: E402

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _extra_layer(state: dict) -> None:
    for key in [k for k in state if k.startswith("model.layers.1.")]:
        state[key.replace("layers.1.", "layers.2.")] = state[key].clone()


HF_CASES = {  # case -> (edit of the folder, what the one line says after "does not match config.json: ")
    "deleted-q-proj": (lambda f: edit_state(f, lambda s: s.pop(Q_PROJ)), f"missing {Q_PROJ}"),
    "fewer-layers-in-config": (lambda f: edit_config(f, num_hidden_layers=1),
                               "unexpected model.layers.1.input_layernorm.weight (+8 more)"),
    "extra-layer-in-file": (lambda f: edit_state(f, _extra_layer),
                            "unexpected model.layers.2.input_layernorm.weight (+8 more)"),
    "q-proj-int32": (lambda f: edit_state(f, lambda s: s.update({Q_PROJ: s[Q_PROJ].to(torch.int32)})),
                     f"{Q_PROJ} stored as int32"),
    "wider-mlp-in-config": (lambda f: edit_config(f, intermediate_size=256),
                            "model.layers.0.mlp.down_proj.weight has shape (96, 192) where config.json implies "
                            "(96, 256) (+5 more)"),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_weights_that_do_not_match_the_config_exit_2(compress_here, tiny_llama, tmp_path, case):
    folder = copy_folder(tiny_llama, tmp_path)
    edit, expected = HF_CASES[case]
    edit(folder)
    out = tmp_path / "out"
    done = compress_here("run", str(folder), "--out", str(out), "--quiet")
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {folder}/model.safetensors does not match config.json: {expected}\n"
    assert not out.exists()  # refused from the header, before the output folder is made


def test_every_kind_of_mismatch_in_one_line(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama, tmp_path)

    def edit(state):
        state.pop("model.layers.1.mlp.up_proj.weight")
        state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"].to(torch.int8)
        state["model.extra.weight"] = torch.zeros(2)

    edit_state(folder, edit)
    with pytest.raises(UserError) as error:
        hf_model_skeleton(folder)
    assert str(error.value) == (f"{folder}/model.safetensors does not match config.json: missing "
                                f"model.layers.1.mlp.up_proj.weight; unexpected model.extra.weight; "
                                f"model.layers.0.self_attn.k_proj.weight stored as int8")


def test_the_loader_refuses_them_too_without_the_skeleton(tiny_llama, tmp_path):
    """The API's own entry (load_hf_checkpoint) checks the header before transformers reads a weight."""
    folder = copy_folder(tiny_llama, tmp_path)
    edit_state(folder, lambda s: s.pop(Q_PROJ))
    with pytest.raises(UserError, match=f"does not match config.json: missing {Q_PROJ}$"):
        load_hf_checkpoint(folder)


def test_sharded_and_torch_state_dict_folders_are_checked(tiny_llama, tmp_path):
    """A sharded safetensors folder (index.json) and a pytorch_model.bin are read from their headers too."""
    state = load_file(str(tiny_llama / "model.safetensors"))
    sharded = copy_folder(tiny_llama, tmp_path)
    (sharded / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": [k for k in state if "layers.0." not in k],
              "model-00002-of-00002.safetensors": [k for k in state if "layers.0." in k]}
    for name, part in halves.items():
        if name.startswith("model-00002"):
            part = [k for k in part if k != Q_PROJ]
        save_file({k: state[k] for k in part}, str(sharded / name), metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert Q_PROJ in halves["model-00002-of-00002.safetensors"]  # the deleted tensor is in the second shard
    with pytest.raises(UserError, match=f"index.json does not match config.json: missing {Q_PROJ}$"):
        hf_model_skeleton(sharded)

    pickled = tmp_path / "bin"
    shutil.copytree(tiny_llama, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({k: v.to(torch.int32) if k == Q_PROJ else v for k, v in state.items()}, pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match=f"pytorch_model.bin does not match config.json: {Q_PROJ} stored as int32$"):
        hf_model_skeleton(pickled)


def test_an_index_naming_a_file_outside_the_folder_is_refused(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama, tmp_path)
    shutil.move(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    keys = load_file(str(tmp_path / "elsewhere.safetensors")).keys()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../elsewhere.safetensors" for k in keys}}))
    with pytest.raises(UserError, match=r"names the weights file '../elsewhere.safetensors', which is not a file in"):
        load_hf_checkpoint(folder)


def test_tied_head_and_unsaved_or_old_buffers_are_accepted(tiny_llama, tmp_path):
    """tiny_llama saves no lm_head (tied to embed_tokens) and no rotary inv_freq (not a persistent buffer); an old
    checkpoint that saved inv_freq per layer loads the same."""
    assert "lm_head.weight" not in load_file(str(tiny_llama / "model.safetensors"))
    hf_model_skeleton(tiny_llama)
    folder = copy_folder(tiny_llama, tmp_path)
    edit_state(folder, lambda s: s.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(12)
                                            for i in range(2)}))
    hf_model_skeleton(folder)
    # an untied head with its weights deleted is missing, though
    edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(UserError, match="missing lm_head.weight$"):
        hf_model_skeleton(folder)


def test_gpt2_as_the_hub_stores_it_is_accepted(tiny_llama, tmp_path):
    """GPT-2's original checkpoints name their tensors without the `transformer.` prefix and keep the attention
    mask buffers (h.N.attn.bias), which transformers drops on purpose."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # tiny_llama's byte-level BPE
        shutil.copy(tiny_llama / name, folder)
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_model_skeleton(folder)
    checkpoint = load_hf_checkpoint(folder)  # transformers' own loading report agrees: nothing random
    ids = torch.randint(0, vocab, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(ids), model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_bert_task_checkpoint_and_missing_pooler_are_accepted(tmp_path):
    """An encoder saved with a task head (bert.* + cls.*) loads its base model; the pooler, which the sentence
    embedder drops, need not be saved. A deleted encoder tensor is still refused."""
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefgh"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = transformers.BertConfig(vocab_size=13, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64,
                                     architectures=["BertForMaskedLM"])
    transformers.BertForMaskedLM(config).save_pretrained(str(folder))
    assert any(k.startswith("cls.") for k in load_file(str(folder / "model.safetensors")))
    hf_model_skeleton(folder)
    edit_state(folder, lambda s: [s.pop(k) for k in list(s) if ".pooler." in k])
    hf_model_skeleton(folder)
    edit_state(folder, lambda s: s.pop("bert.encoder.layer.0.output.dense.weight"))
    with pytest.raises(UserError, match="missing encoder.layer.0.output.dense.weight$"):
        hf_model_skeleton(folder)


def _gguf_extra_block(tensors: dict) -> None:
    for name in [n for n in tensors if n.startswith("blk.1.")]:
        tensors[name.replace("blk.1.", "blk.2.")] = tensors[name].copy()


GGUF_CASES = {  # case -> (write_gguf arguments, what the line says after "does not match its metadata (...)")
    "other-family": ({"architecture": "qwen2"}, "qwen2", 2, "missing blk.0.attn_k.bias (+5 more)"),
    "another-family": ({"architecture": "gpt2"}, "gpt2", 2,
                       "missing blk.0.attn_norm.bias (+15 more); unexpected blk.0.attn_k.weight (+7 more); "
                       "blk.0.ffn_down.weight has shape (96, 192) where the metadata implies (384, 96) (+3 more)"),
    "deleted-q-proj": ({"edit": lambda t: t.pop("blk.0.attn_q.weight")}, "llama", 2, "missing blk.0.attn_q.weight"),
    "fewer-blocks-in-metadata": ({"blocks": 1}, "llama", 1, "unexpected blk.1.attn_k.weight (+8 more)"),
    "extra-block-in-file": ({"edit": _gguf_extra_block}, "llama", 2, "unexpected blk.2.attn_k.weight (+8 more)"),
    "q-proj-int32": ({"edit": lambda t: t.update({"blk.0.attn_q.weight": (t["blk.0.attn_q.weight"] * 100).astype(
        np.int32)})}, "llama", 2, "blk.0.attn_q.weight stored as I32"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_tensors_that_do_not_match_its_metadata_exit_2(compress_here, tiny_llama, tmp_path, monkeypatch, case):
    arguments, family, blocks, expected = GGUF_CASES[case]
    path = write_gguf(tiny_llama, tmp_path / "model.gguf", **arguments)
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    done = compress_here("run", str(path), "--out", str(out), "--quiet")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: {path} does not match its metadata (general.architecture {family!r}, "
                           f"block_count {blocks}): {expected}\n")
    assert not out.exists() and not (tmp_path / "cache").exists()  # refused before anything is dequantized


def test_a_matching_gguf_loads_the_same_model_and_prints_no_progress_bar(compress_here, tiny_llama, tmp_path,
                                                                         monkeypatch, capfd):
    """The writer above is right (so the refusals are of its edits alone): the GGUF loads to the folder's logits,
    and without progress transformers' own tqdm bar stays off."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_llama, tmp_path / "model.gguf")
    hf_model_skeleton(path)
    checkpoint = load_hf_checkpoint(path, progress=False)
    assert "GGUF tensors" not in capfd.readouterr().err
    reference = load_hf_checkpoint(tiny_llama)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(ids), reference.model(ids), rtol=1e-5, atol=1e-5)


def test_gguf_metadata_far_deeper_than_its_tensors_is_refused_before_building(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, tmp_path / "model.gguf", blocks=10**9)
    with pytest.raises(UserError, match=r"its metadata implies [\d,]+ parameters but the file holds [\d,]+ values"):
        hf_model_skeleton(path)


def test_transformers_own_loading_report_is_a_last_check():
    """A tensor transformers reports as initialised at random, past the header check, is refused too."""
    from compressor.inputs.hf import _check_loading_info

    _check_loading_info({"missing_keys": {"pooler.dense.weight"}}, Path("w"), "hf-encoder")  # dropped anyway
    with pytest.raises(UserError, match="^w does not match config.json: missing lm_head.weight$"):
        _check_loading_info({"missing_keys": {"lm_head.weight"}, "unexpected_keys": set()}, Path("w"), "hf-causal-lm")

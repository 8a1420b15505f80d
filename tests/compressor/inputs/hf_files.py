"""Hugging Face folders and GGUF files for tests: a copy of a folder with its config or tensors edited, and GGUF
files written with gguf's own writer from a Llama folder's tensors (no download): llama.cpp's layout (q and k rows
permuted as its converter does), a byte-level BPE tokenizer from the folder's tokenizer.json."""
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file


def copy_folder(folder: Path, tmp_path: Path, **config_changes) -> Path:
    """A copy of `folder` (shared fixtures are read-only) with `config_changes` made to its config.json."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    if config_changes:
        edit_config(copy, **config_changes)
    return copy


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_state(folder: Path, edit) -> None:
    """`edit` changes the {name: tensor} of the folder's model.safetensors in place."""
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


BLOCK = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
         "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}


def _gguf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """tiny_llama's tensors under GGUF names, q and k rows permuted as llama.cpp's converter does."""
    config = json.loads((folder / "config.json").read_text())

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    tensors = {}
    for key, value in load_file(str(folder / "model.safetensors")).items():
        array = value.float().numpy()
        if key == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = array
        elif key == "model.norm.weight":
            tensors["output_norm.weight"] = array
        else:
            _, _, block, *module, _ = key.split(".")
            name = BLOCK[module[-1]]
            if name == "attn_q":
                array = permute(array, config["num_attention_heads"])
            elif name == "attn_k":
                array = permute(array, config["num_key_value_heads"])
            tensors[f"blk.{block}.{name}.weight"] = array
    return tensors


def write_gguf(folder: Path, path: Path, architecture: str = "llama", edit=None, blocks: int | None = None,
               context: int | None = None) -> Path:
    """`folder`'s model as a GGUF file of `architecture`; `edit` changes its {name: array} tensors, `blocks` and
    `context` its block_count and context_length."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    for key, value in (("block_count", blocks or config["num_hidden_layers"]),
                       ("context_length", context or config["max_position_embeddings"]),
                       ("embedding_length", config["hidden_size"]),
                       ("feed_forward_length", config["intermediate_size"]),
                       ("attention.head_count", config["num_attention_heads"]),
                       ("attention.head_count_kv", config["num_key_value_heads"])):
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    writer.add_float32(f"{architecture}.rope.freq_base", float(config.get("rope_theta", 10000.0)))
    vocab = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(0)
    tensors = _gguf_tensors(folder)
    if edit:
        edit(tensors)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

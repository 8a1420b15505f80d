"""genai_config.json for a KV-cache decoder graph (exporters.decoder_graph), so that ONNX Runtime GenAI's
`onnxruntime_genai.Model(DIR)` generates from the artifact folder. Everything comes from the graph itself
(layers, heads, head size, vocabulary) and the model's own config.json / generation_config.json (special
tokens); the fields are those Model Builder writes (onnxruntime_genai/models/builders/base.py)."""
import hashlib
import json
from pathlib import Path

import onnx

from exporters.decoder_graph import PAST, PRESENT


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _special_tokens(folder: Path) -> dict:
    tokens = {}
    for name in ("config.json", "generation_config.json"):  # the second overrides, as Model Builder does
        try:
            record = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = _token_ids(record.get(key))
            if value is not None:
                tokens[key] = value
    tokens.setdefault("pad_token_id", tokens.get("eos_token_id", 0))
    if isinstance(tokens["pad_token_id"], list):
        tokens["pad_token_id"] = tokens["pad_token_id"][0]
    return tokens


def _token_ids(value) -> int | list[int] | None:
    """A token id (or a non-empty list of them, as eos_token_id may be) as ONNX Runtime GenAI reads it; None for
    anything else (a string, an empty list, a negative id), which is then left out as if not given."""
    def is_id(item) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 2**31

    if is_id(value):
        return value
    if isinstance(value, list) and value and all(is_id(item) for item in value):
        return value
    return None


def genai_config(proto: onnx.ModelProto, filename: str, context_length: int, model_folder: Path,
                 model_type: str = "llama") -> dict:
    graph = proto.graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    past = [i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    dims = past[0].type.tensor_type.shape.dim
    initializers = {t.name: t for t in graph.initializer}
    norm = next(n for n in graph.node if n.op_type.startswith("Skip"))  # its gamma is [hidden]
    vocab = graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    tokens = _special_tokens(model_folder)
    return {
        "model": {
            "bos_token_id": tokens.get("bos_token_id", 0),
            "context_length": int(context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(dims[3].dim_value),
                "hidden_size": int(initializers[norm.input[2]].dims[0]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": PAST.format("%d", "key"), "past_value_names": PAST.format("%d", "value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT.format("%d", "key"),
                            "present_value_names": PRESENT.format("%d", "value")},
                "num_attention_heads": _attribute(attention[0], "num_heads"),
                "num_hidden_layers": len(past),
                "num_key_value_heads": int(dims[1].dim_value),
            },
            "eos_token_id": tokens.get("eos_token_id", 0),
            "pad_token_id": tokens["pad_token_id"],
            "type": model_type,
            "vocab_size": int(vocab),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": int(context_length), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


GENAI_CONFIG = "genai_config.json"
# what a tokenizer needs beside the artifact (ONNX Runtime GenAI reads tokenizer.json + tokenizer_config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")


def tokenizer_files(model_folder: Path) -> dict[str, bytes]:
    """{file name: bytes} of the model's tokenizer files, which go beside any artifact of a model with a tokenizer
    (`compress check`, `generate` and an ONNX input read them there)."""
    return {name: (model_folder / name).read_bytes() for name in TOKENIZER_FILES if (model_folder / name).is_file()}


def tokenizer_sha256(files: dict[str, bytes]) -> str:
    """One sha256 over tokenizer files (names, sizes and bytes, by name): what an artifact's metadata records of
    its tokenizer in place of the folder it was read from."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(files[name])
    return digest.hexdigest()


def generation_files(proto: onnx.ModelProto, filename: str, context_length: int, model_folder: Path,
                     model_type: str) -> dict[str, bytes]:
    """{file name: bytes} to put beside a KV-cache decoder artifact: genai_config.json and the model's
    tokenizer files; empty for a graph without a cache."""
    if not any(i.name.startswith("past_key_values.") for i in proto.graph.input):
        return {}
    files = tokenizer_files(model_folder)
    config = genai_config(proto, filename, context_length, model_folder, model_type)
    files[GENAI_CONFIG] = (json.dumps(config, indent=4) + "\n").encode()
    return files

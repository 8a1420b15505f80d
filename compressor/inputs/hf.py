"""Hugging Face checkpoints as users have them: a local model folder (config.json + safetensors or a
pytorch_model.bin), or a GGUF-packed decoder (a .gguf file, or a folder holding one).

Never touches the network (offline mode before transformers is imported). Weights load through safetensors or
transformers' own loader with weights_only unpickling. A GGUF file is dequantized once into a cached
safetensors folder (COMPRESSOR_CACHE, keyed by the file's sha256), so later runs start from plain fp32 weights.
"""
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from compressor.atomic import sha256_file
from compressor.errors import UserError
from compressor.hf_offline import offline_transformers
from compressor.inputs.checkpoint import check_plausible_size, expected_params, out_of_memory, out_of_memory_error
from compressor.inputs.source import Checkpoint, Source
from compressor.inputs.torch_source import torch_source
from compressor.inputs.hf_models import CausalLMLogits, SentenceEmbedder, conv1d_to_linear
from passes.calibration import first_line

# Architectures we know how to feed and evaluate: encoders become sentence embedders, decoders LMs.
ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "deberta", "deberta-v2")
DECODER_TYPES = ("llama", "gpt2", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "smollm3", "olmo")
DEFAULT_CONTEXT = 256  # tokens per perplexity window for decoder LMs
ENCODER_MAX_LENGTH = 128  # tokens per sentence for encoders (all-MiniLM-L6-v2 was trained at 128)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_hf_checkpoint(path: Path) -> bool:
    """A .gguf file, a folder with one, or a folder whose config.json names a transformers model_type."""
    path = Path(path)
    if path.suffix == ".gguf":
        return True
    if not path.is_dir():
        return False
    try:
        record = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if isinstance(record, dict) and record.get("format") == "compressor-checkpoint":
        return False  # our own checkpoint, whatever else lies in its folder (e.g. a stray .gguf)
    if list(path.glob("*.gguf")):
        return True
    return isinstance(record, dict) and "model_type" in record


def _cache_root() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise UserError(f"{path} holds several .gguf files ({', '.join(f.name for f in found)}): name one")
    return found[0]


def dequantized_gguf_folder(gguf: Path, progress: bool = False) -> Path:
    """A transformers folder (fp32 safetensors + config + tokenizer) made from `gguf` once, then reused."""
    transformers = offline_transformers()
    digest = sha256_file(gguf)
    folder = _cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (folder / "model.safetensors").is_file():
        return folder
    if progress:
        print(f"dequantizing {gguf.name} once into {folder}", flush=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise UserError(f"GGUF loading needs the gguf package: pip install 'compressor[hf]' ({exc})") from None
    except Exception as exc:  # the GGUF reader fails in many ways (struct, reshape, version): all mean "unreadable"
        raise UserError(f"{gguf} is not a GGUF decoder transformers can read ({first_line(exc, 200)})") from None
    # The weights are plain fp32 now; drop the GGUF marker so the folder saves and loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
        (scratch / "gguf_source.json").write_text(json.dumps({"file": gguf.name, "sha256": digest}) + "\n")
        os.replace(scratch, folder)  # the folder appears complete or not at all
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _read_hf_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (a Hugging Face model folder needs one)")
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or "model_type" not in record:
        raise UserError(f"{config_path} has no model_type")
    return record


def _weights_file(folder: Path) -> Path:
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise UserError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})")
    return found


def _check_weights(model: torch.nn.Module, where: Path) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{where}: tensor {name} contains NaN or Inf values")


def _family_and_auto(folder: Path, record: dict, transformers):
    model_type = record["model_type"]
    if model_type in ENCODER_TYPES:
        return "hf-encoder", transformers.AutoModel
    architectures = record.get("architectures")
    architectures = architectures if isinstance(architectures, list) else []
    if model_type in DECODER_TYPES or any(str(a).endswith("ForCausalLM") for a in architectures):
        return "hf-causal-lm", transformers.AutoModelForCausalLM
    raise UserError(f"{folder}: model_type {model_type!r} is not supported "
                    f"(encoders: {', '.join(ENCODER_TYPES)}; decoder LMs: {', '.join(DECODER_TYPES)})")


def _check_size(config, auto, folder: Path) -> None:
    """The parameters config.json implies against the bytes of the folder's weights files, before a model of
    the config's depth is built (num_hidden_layers: 1000000000 would otherwise hang the meta-device build)."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return

    def build(values: dict):
        small = copy.deepcopy(config)
        small.num_hidden_layers = values["num_hidden_layers"]
        return auto.from_config(small)

    params = expected_params(build, {"num_hidden_layers": layers}, ["num_hidden_layers"])
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(pattern)]
    check_plausible_size(params, weights, folder / "config.json")


def hf_model_skeleton(path: Path) -> torch.nn.Module | None:
    """The folder's model built on the meta device from config.json alone (layer shapes, no weights), wrapped as
    it will be exported, so a recipe can be checked before the weights load; None for GGUF inputs, whose config
    exists only after dequantization."""
    path = Path(path)
    if not path.is_dir() or _is_gguf(path):
        return None
    transformers = offline_transformers()
    record = _read_hf_config(path)
    family, auto = _family_and_auto(path, record, transformers)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        _check_size(config, auto, path)
        with torch.device("meta"):
            inner = auto.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"{path}/config.json: invalid model config ({first_line(exc, 200)})") from None
    conv1d_to_linear(inner)
    return SentenceEmbedder(inner) if family == "hf-encoder" else CausalLMLogits(inner)


def load_hf_checkpoint(path: Path, progress: bool = False) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    transformers = offline_transformers()
    gguf = None
    if _is_gguf(path):
        gguf = _gguf_file(path)
        folder = dequantized_gguf_folder(gguf, progress)
    else:
        folder = path
    record = _read_hf_config(folder)
    model_type = record["model_type"]
    family, auto = _family_and_auto(folder, record, transformers)
    weights = _weights_file(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        # eager attention: one plain softmax(QKᵀ)V graph that exports the same for every input shape
        inner = auto.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager",
                                     use_safetensors=weights.name.startswith("model.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError, MemoryError) as exc:
        if out_of_memory(exc):  # safetensors maps the weights: their size counts against the address space
            raise out_of_memory_error(weights) from None
        raise UserError(f"{folder}: transformers could not load the model ({first_line(exc, 200)})") from None
    inner.eval()
    _check_weights(inner, weights)
    conv1d_to_linear(inner)
    hf_config = inner.config.to_dict()
    config = {"model_type": model_type, "tokenizer": str(folder.resolve()),
              "vocab_size": int(hf_config.get("vocab_size") or 0)}
    if family == "hf-causal-lm":
        model = CausalLMLogits(inner)
        positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or DEFAULT_CONTEXT
        config["context"] = int(min(DEFAULT_CONTEXT, positions))
        config["max_positions"] = int(positions)
    else:
        model = SentenceEmbedder(inner)
        config["max_length"] = int(min(ENCODER_MAX_LENGTH, hf_config.get("max_position_embeddings") or 512))
    model.eval()
    source = gguf or weights
    name = gguf.stem if gguf else path.resolve().name
    if name in ("model", "models", "checkpoint"):  # e.g. <package>/model: the parent says which model it is
        name = path.resolve().parent.name
    return Checkpoint(name=name, family=family, config=config,
                      model=model, weights_path=source, weights_sha256=sha256_file(source),
                      metadata={"hf_config": hf_config})


def hf_source(path: Path, progress: bool = False) -> Source:
    return torch_source(load_hf_checkpoint(path, progress), path, "gguf" if _is_gguf(path) else "hugging-face")


def _is_gguf(path: Path) -> bool:
    return Path(path).suffix == ".gguf" or (Path(path).is_dir() and bool(list(Path(path).glob("*.gguf"))))

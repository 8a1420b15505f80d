"""Hugging Face checkpoints as users have them: a local model folder (config.json + safetensors or a
pytorch_model.bin), or a GGUF-packed decoder (a .gguf file, or a folder holding one).

Never touches the network (offline mode before transformers is imported). Weights load through safetensors or
transformers' own loader with weights_only unpickling. Before any weight loads, the model the config (or a GGUF's
metadata) describes is built on the meta device, the sizes it allocates beyond its weights are bounded, and the
names, dtypes and shapes in the weights' headers are checked against it (transformers would fill a missing tensor
at random, drop an unexpected one and cast integers to float). A GGUF file is dequantized once into a cached
safetensors folder (COMPRESSOR_CACHE, keyed by the file's sha256), so later runs start from plain fp32 weights.
"""
import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from compressor.atomic import sha256_file
from compressor.errors import UserError
from compressor.hf_offline import offline_transformers
from compressor.inputs.checkpoint import (check_plausible_size, expected_params, mismatch_error, out_of_memory,
                                         out_of_memory_error, read_torch_state_dict)
from compressor.inputs.source import Checkpoint, Source
from compressor.inputs.torch_source import torch_source
from compressor.inputs.hf_models import CausalLMLogits, SentenceEmbedder, conv1d_to_linear
from compressor.inputs.onnx import MAX_POSITIONS
from compressor.tasks.hf_tokenizer import load_tokenizer
from exporters.decoder_graph import MAX_ROTARY_TABLE_BYTES, max_rotary_positions, rotary_table_bytes
from passes.calibration import first_line

try:  # transformers 5 validates configs as huggingface_hub strict dataclasses, with exceptions of their own
    from huggingface_hub.errors import StrictDataclassError

    CONFIG_ERRORS: tuple[type[Exception], ...] = (StrictDataclassError,)
except ImportError:
    CONFIG_ERRORS = ()


# Architectures we know how to feed and evaluate: encoders become sentence embedders, decoders LMs.
ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "deberta", "deberta-v2")
DECODER_TYPES = ("llama", "gpt2", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "smollm3", "olmo")
DEFAULT_CONTEXT = 256  # tokens per perplexity window for decoder LMs
ENCODER_MAX_LENGTH = 128  # tokens per sentence for encoders (all-MiniLM-L6-v2 was trained at 128)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_hf_checkpoint(path: Path) -> bool:
    """A .gguf file, a folder with one, or a folder whose config.json names a transformers model_type (whatever
    the folder's own name: our checkpoint in a folder named x.gguf is ours)."""
    path = Path(path)
    if not path.is_dir():
        return path.suffix == ".gguf"
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


GGUF_INT_TYPES = ("I8", "I16", "I32", "I64")
GGUF_UNLOADED = ("rope_freqs.", "rope_factors_")  # rotary scaling tables transformers takes from the metadata


def _gguf_meta_model(gguf: Path) -> torch.nn.Module:
    """The decoder a GGUF file's metadata describes, built on the meta device, with the file's tensors (names,
    types, sizes, from its header) checked against it: transformers would initialise a tensor the file lacks at
    random and drop one its mapping does not name."""
    transformers = offline_transformers()
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        config = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise UserError(f"GGUF loading needs the gguf package: pip install 'compressor[hf]' ({exc})") from None
    except Exception as exc:  # the GGUF reader fails in many ways (struct, reshape, version): all mean "unreadable"
        raise UserError(f"{gguf} is not a GGUF decoder transformers can read ({first_line(exc, 200)})") from None
    auto = transformers.AutoModelForCausalLM
    try:
        params = _config_params(config, auto)
        held = sum(int(t.n_elements) for t in reader.tensors)
        if params is not None and params > held * 1.05 + (1 << 20):
            raise UserError(f"{gguf}: its metadata implies {params:,} parameters but the file holds {held:,} "
                            f"values: the metadata does not describe these tensors")
        with torch.device("meta"):
            model = auto.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, AssertionError, *CONFIG_ERRORS) as exc:
        raise UserError(f"{gguf}: its metadata is not a model config transformers can build "
                        f"({first_line(exc, 200)})") from None
    _check_allocations(model, f"{gguf} (its metadata)")
    _check_gguf_tensors(reader, model, gguf)
    return model


def _check_gguf_tensors(reader, model: torch.nn.Module, gguf: Path) -> None:
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    field = reader.fields.get("general.architecture")
    family = field.contents() if field is not None else None
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == family), None)
    if arch is None:
        return  # no tensor names known for it: transformers' loader says what it makes of the file
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    expected = model.state_dict()
    to_gguf = {}  # model key -> the GGUF tensor it is loaded from (as transformers' GGUF mapping names it)
    for key in expected:
        parts = key.split(".")
        for start in range(len(parts) - 1):  # as transformers tries the model, then its submodules
            found = names.get_name(".".join(parts[start:]), try_suffixes=(".weight", ".bias"))
            if found:
                to_gguf[key] = found
                break
    tensors = {t.name: t for t in reader.tensors}
    missing = {to_gguf[key] for key in to_gguf if to_gguf[key] not in tensors}
    for group in _tied_groups(model):
        if any(to_gguf.get(key) in tensors for key in group):
            missing -= {to_gguf[key] for key in group if key in to_gguf}
    wanted = set(to_gguf.values())
    unexpected = [name for name in tensors if name not in wanted and not name.startswith(GGUF_UNLOADED)]
    mistyped, misshaped = [], []
    for key, name in to_gguf.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if tensor.tensor_type.name in GGUF_INT_TYPES and expected[key].is_floating_point():
            mistyped.append(f"{name} stored as {tensor.tensor_type.name}")
        elif int(tensor.n_elements) != expected[key].numel():
            misshaped.append(f"{name} has shape {tuple(int(d) for d in reversed(tensor.shape))} where the metadata "
                             f"implies {tuple(expected[key].shape)}")
    error = mismatch_error(gguf, f"its metadata (general.architecture {family!r}, block_count "
                                 f"{model.config.num_hidden_layers})", list(missing), unexpected, mistyped, misshaped)
    if error:
        raise error


@contextlib.contextmanager
def _gguf_progress_bar(progress: bool):
    """transformers' GGUF reader draws its own tqdm bar, which its disable_progress_bar does not reach: without
    progress (--quiet) it is switched off for the load, so an error stays one line."""
    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        reader = None
    bar = getattr(reader, "tqdm", None)
    if progress or bar is None:
        yield
        return
    reader.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        reader.tqdm = bar


def dequantized_gguf_folder(gguf: Path, progress: bool = False) -> Path:
    """A transformers folder (fp32 safetensors + config + tokenizer) made from `gguf` once, then reused."""
    transformers = offline_transformers()
    digest = sha256_file(gguf)
    folder = _cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if _cached(folder):
        return folder
    _gguf_meta_model(gguf)  # the tensors against the metadata, before any is dequantized
    if progress:
        print(f"dequantizing {gguf.name} once into {folder}", flush=True)
    try:
        with _gguf_progress_bar(progress):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise UserError(f"GGUF loading needs the gguf package: pip install 'compressor[hf]' ({exc})") from None
    except Exception as exc:  # the GGUF reader fails in many ways (struct, reshape, version): all mean "unreadable"
        raise UserError(f"{gguf} is not a GGUF decoder transformers can read ({first_line(exc, 200)})") from None
    _check_loading_info(info, gguf, "hf-causal-lm", "its metadata")
    # The weights are plain fp32 now; drop the GGUF marker so the folder saves and loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    scratch = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        model.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
        (scratch / "gguf_source.json").write_text(json.dumps({"file": gguf.name, "sha256": digest}) + "\n")
        _move_into_place(scratch, folder)
    except (OSError, SafetensorError) as exc:  # e.g. a full disk, a read-only cache
        raise UserError(f"cannot write the GGUF cache {folder}: {getattr(exc, 'strerror', None) or first_line(exc)} "
                        f"(free space there, or set COMPRESSOR_CACHE to another folder)") from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _cached(folder: Path) -> bool:
    """Whether a cache folder is whole (gguf_source.json is written last, and the folder moves into place in one
    rename): one a crash, a user or an older version left part-written is made again, not used."""
    if not ((folder / "gguf_source.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        _safetensors_header(folder / "model.safetensors")
    except UserError:
        return False
    return True


def _move_into_place(scratch: Path, folder: Path) -> None:
    """The folder appears complete or not at all. Where another run (from the same file: its sha256 names the
    folder) put one there first, that one is kept; a broken one is replaced."""
    try:
        os.replace(scratch, folder)
    except OSError:
        if _cached(folder):
            return
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)


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


# safetensors' dtype names as torch spells them (the messages say int32 whatever file held it)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                      "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _stored_tensors(folder: Path, weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor the folder's weights hold, read from the safetensors headers (or a
    torch state dict mapped, not read) before anything loads."""
    if weights.name.endswith(".index.json"):
        try:
            index = json.loads(weights.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{weights} is not a weights index (a weight_map of tensor -> file; {first_line(exc)})") \
                from None
        files = []
        for shard in shards:
            file = folder / str(shard)
            if file.resolve().parent != folder.resolve() or not file.is_file():
                raise UserError(f"{weights} names the weights file {shard!r}, which is not a file in {folder}")
            files.append(file)
    else:
        files = [weights]
    stored = {}
    for file in files:
        stored.update(_safetensors_header(file) if file.suffix == ".safetensors" else _torch_header(file))
    return stored


def _safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: (SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(),
                                                 handle.get_slice(key).get_dtype().lower()),
                          tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}
    except Exception as exc:
        if out_of_memory(exc):  # safetensors maps the file: its size counts against the address space
            raise out_of_memory_error(file) from None
        if isinstance(exc, (SafetensorError, OSError, ValueError)):
            raise UserError(f"{file} is not a readable safetensors file ({first_line(exc, 200)})") from None
        raise


def _torch_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    state = read_torch_state_dict(file, map_location="meta")
    return {key: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for key, t in state.items()}


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _tied_groups(model: torch.nn.Module) -> list[set[str]]:
    """State-dict keys that name one tensor (lm_head tied to the embedding table): the weights need hold only one."""
    by_tensor: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), set()).add(name)
    groups = [names for names in by_tensor.values() if len(names) > 1]
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        groups.append({target, source})
    return groups


def _renamer(model: torch.nn.Module, expected: dict):
    """checkpoint key -> (the model key transformers loads it into, whether a converter merges it with others):
    its renamings (LayerNorm.gamma -> weight, ...) and the base-model prefix added or stripped."""
    prefix = getattr(model, "base_model_prefix", None) or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model, None, None) or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except (ImportError, AttributeError, TypeError):  # another transformers: plain names and the prefix
        rename_source_key = None

    def rename(key: str) -> tuple[str, bool]:
        if rename_source_key is not None:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if renamed not in expected and key in expected:
                renamed, pattern = rename_source_key(key, [], [], prefix, expected)
            return renamed, pattern is not None
        if key not in expected and prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:], False
        if key not in expected and prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}", False
        return key, False

    return rename


def _ignored(model: torch.nn.Module, attribute: str, extra: tuple[str, ...] = ()):
    """transformers' own patterns of keys it leaves out on purpose (e.g. GPT-2's attn.bias masks)."""
    import re

    patterns = set(getattr(model, attribute, None) or ()) | set(extra)
    regex = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    return lambda key: regex is not None and regex.search(key) is not None


def check_weights_match_config(model: torch.nn.Module, stored: dict[str, tuple[str, tuple[int, ...]]],
                               where: Path, config_name: str, unused: tuple[str, ...] = ()) -> None:
    """Refuse weights that do not fill the model `config_name` describes (`model` on the meta device): tensors
    missing (transformers would initialise them at random), unexpected (it would drop them), stored as integers
    (it would cast them) or of another shape. Tied tensors need one copy, buffers the model does not save (rotary
    inv_freq) none, and a task checkpoint's head is not loaded into a base model; `unused`: prefixes of modules
    the wrapper drops (an encoder's pooler)."""
    expected = model.state_dict()  # persistent parameters and buffers, on the meta device
    rename = _renamer(model, expected)
    buffers = {name for name, _ in model.named_buffers()}
    extra_unexpected = tuple(p for p, suffix in ((r"rotary_emb\.inv_freq", "rotary_emb.inv_freq"),
                                                 (r"(^|\.)position_ids$", "position_ids"))
                             if any(b.endswith(suffix) for b in buffers))
    ignore_unexpected = _ignored(model, "_keys_to_ignore_on_load_unexpected", extra_unexpected)
    ignore_missing = _ignored(model, "_keys_to_ignore_on_load_missing")
    prefix = getattr(model, "base_model_prefix", "")
    # a base model (BertModel) from a task checkpoint (bert.* + cls.*): what lies outside the prefix is the head
    head_outside = bool(prefix) and not any(k.startswith(f"{prefix}.") for k in expected) and any(
        k.startswith(f"{prefix}.") for k in stored)
    found, unexpected, mistyped, misshaped = set(), [], [], []
    for key, (dtype, shape) in stored.items():
        name, converted = rename(key)
        if name not in expected:
            if not (ignore_unexpected(key) or ignore_unexpected(name)
                    or (head_outside and not key.startswith(f"{prefix}."))):
                unexpected.append(key)
            continue
        found.add(name)
        if expected[name].is_floating_point() and not _is_float(dtype):
            mistyped.append(f"{key} stored as {dtype}")
        elif not converted and tuple(expected[name].shape) != shape:
            misshaped.append(f"{key} has shape {shape} where {config_name} implies {tuple(expected[name].shape)}")
    missing = {key for key in expected if key not in found and not ignore_missing(key)
               and not key.startswith(unused)}
    for group in _tied_groups(model):
        if group & found:
            missing -= group
    error = mismatch_error(where, config_name, list(missing), unexpected, mistyped, misshaped)
    if error:
        raise error


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


def _config_params(config, auto) -> int | None:
    """The parameters a config implies, from models of one and two layers (never one of the config's own depth:
    num_hidden_layers: 1000000000 would otherwise hang the meta-device build)."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return None

    def build(values: dict):
        small = copy.deepcopy(config)
        small.num_hidden_layers = values["num_hidden_layers"]
        return auto.from_config(small)

    return expected_params(build, {"num_hidden_layers": layers}, ["num_hidden_layers"])


def _check_size(config, auto, folder: Path) -> None:
    """The parameters config.json implies against the bytes of the folder's weights files, before it is built."""
    params = _config_params(config, auto)
    if params is not None:
        weights = [p for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(pattern)]
        check_plausible_size(params, weights, folder / "config.json")


def _config_reason(exc: Exception) -> str:
    """The first line, and the line under it where the first only names the field ("Validation error for field
    'num_attention_heads':")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return reason[:200]


def _meta_model(folder: Path, auto, transformers) -> torch.nn.Module:
    """The folder's transformers model built on the meta device from config.json alone (no memory, no weights),
    its sizes that no weight bounds checked."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        _check_size(config, auto, folder)
        with torch.device("meta"):
            model = auto.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AssertionError, *CONFIG_ERRORS) as exc:
        # AssertionError: torch's own checks while building (nn.Embedding: padding_idx within num_embeddings)
        raise UserError(f"{folder}/config.json: invalid model config ({_config_reason(exc)})") from None
    _check_allocations(model, f"{folder}/config.json")
    return model


MAX_BUFFER_BYTES = 1 << 30  # buffers a model builds from its config (position ids, masks): not weights, not checked


def _check_allocations(model: torch.nn.Module, where: str) -> None:
    """What the config sizes beyond the weights (which the header check bounds): the model's buffers, and a
    decoder's position limit, which sizes its rotary tables at export and bounds every length after it."""
    buffers = sorted(((b.numel() * b.element_size(), name, tuple(b.shape)) for name, b in model.named_buffers()),
                     reverse=True)
    total = sum(size for size, _, _ in buffers)
    if total > MAX_BUFFER_BYTES:
        raise UserError(f"{where} implies buffers of {total / 2**30:.2f} GiB ({buffers[0][1]} {buffers[0][2]}); "
                        f"at most {MAX_BUFFER_BYTES / 2**30:g} GiB")
    config = model.config
    if not type(model).__name__.endswith("ForCausalLM"):
        return
    key = next((k for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None)
    if key is None:
        return  # DEFAULT_CONTEXT
    positions = getattr(config, key)
    if isinstance(positions, bool) or not isinstance(positions, int) or not 1 <= positions <= MAX_POSITIONS:
        raise UserError(f"{where}: {key} must be an integer in 1..{MAX_POSITIONS:,}, not {positions!r}")
    inv_freq = next((b for name, b in model.named_buffers() if name.endswith("rotary_emb.inv_freq")), None)
    if inv_freq is not None and positions > max_rotary_positions(inv_freq.numel()):
        raise UserError(f"{where}: {key} {positions:,} needs rotary tables of "
                        f"{rotary_table_bytes(positions, inv_freq.numel()) / 2**30:.2f} GiB at export; at most "
                        f"{max_rotary_positions(inv_freq.numel()):,} positions at head_dim {2 * inv_freq.numel()} "
                        f"({MAX_ROTARY_TABLE_BYTES / 2**30:g} GiB)")


def _check_tokenizer(folder: Path) -> None:
    """The folder's tokenizer loads as the tasks will load it (cached there: read once)."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        load_tokenizer(str(folder.resolve()))
    except Exception as exc:  # noqa: BLE001  (a bad file fails as JSON, KeyError, tokenizers' own Exception, ...)
        raise UserError(f"{folder}: its tokenizer cannot be read ({type(exc).__name__}: {first_line(exc, 200)})") \
            from None


def _unused(family: str) -> tuple[str, ...]:
    """Prefixes of modules the wrapper drops, whose weights a folder need not hold (SentenceEmbedder: the pooler)."""
    return ("pooler.",) if family == "hf-encoder" else ()


def _check_folder_weights(folder: Path, inner: torch.nn.Module, family: str) -> None:
    weights = _weights_file(folder)
    check_weights_match_config(inner, _stored_tensors(folder, weights), weights, "config.json", _unused(family))


def _wrap(inner: torch.nn.Module, family: str) -> torch.nn.Module:
    conv1d_to_linear(inner)
    return SentenceEmbedder(inner) if family == "hf-encoder" else CausalLMLogits(inner)


def hf_model_skeleton(path: Path) -> torch.nn.Module | None:
    """The input's model built on the meta device from its config alone (layer shapes, no weights), wrapped as it
    will be exported, so a recipe can be checked before the weights load. Weights that do not match the config
    are refused here, from their headers; weights that cannot be read at all are the loader's to report (after the
    recipe is checked)."""
    path = Path(path)
    if not path.exists():
        return None  # the loader says so
    if _is_gguf(path):
        return _wrap(_gguf_meta_model(_gguf_file(path)), "hf-causal-lm")
    transformers = offline_transformers()
    record = _read_hf_config(path)
    family, auto = _family_and_auto(path, record, transformers)
    inner = _meta_model(path, auto, transformers)
    try:
        weights = _weights_file(path)
        stored = _stored_tensors(path, weights)
    except UserError:  # no weights, or unreadable ones: the loader says so, once the recipe is checked
        return _wrap(inner, family)
    check_weights_match_config(inner, stored, weights, "config.json", _unused(family))
    _check_tokenizer(path)
    return _wrap(inner, family)


def _check_loading_info(info: dict, where: Path, family: str, config_name: str = "config.json") -> None:
    """What transformers itself reports after loading: a tensor it had to initialise at random is refused, whatever
    the header check above could not see (e.g. a name only its own mapping knows)."""
    missing = [k for k in info.get("missing_keys") or () if not str(k).startswith(_unused(family))]
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()]
    error = mismatch_error(where, config_name, missing, [], [], [f"{k} has another shape" for k in mismatched])
    if error:
        raise error


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
    _check_tokenizer(folder)
    # names, dtypes and shapes against the config before any weight is read: transformers would fill a missing
    # tensor at random, drop an unexpected one and cast integers to float
    _check_folder_weights(folder, _meta_model(folder, auto, transformers), family)
    try:
        # eager attention: one plain softmax(QKᵀ)V graph that exports the same for every input shape
        inner, info = auto.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager",
                                           use_safetensors=weights.name.startswith("model.safetensors"),
                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError, MemoryError) as exc:
        if out_of_memory(exc):  # safetensors maps the weights: their size counts against the address space
            raise out_of_memory_error(weights) from None
        raise UserError(f"{folder}: transformers could not load the model ({first_line(exc, 200)})") from None
    _check_loading_info(info, weights, family)
    inner.eval()
    _check_weights(inner, weights)
    hf_config = inner.config.to_dict()
    config = {"model_type": model_type, "tokenizer": str(folder.resolve()),
              "vocab_size": int(hf_config.get("vocab_size") or 0)}
    model = _wrap(inner, family)
    if family == "hf-causal-lm":
        positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or DEFAULT_CONTEXT
        config["context"] = int(min(DEFAULT_CONTEXT, positions))
        config["max_positions"] = int(positions)
    else:
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
    """A .gguf file, or a folder holding one and no config.json of its own."""
    path = Path(path)
    if path.is_dir():
        return not (path / "config.json").is_file() and bool(list(path.glob("*.gguf")))
    return path.suffix == ".gguf"

"""A decoder's weights read one tensor at a time from disk, for runs that never hold the whole model.

Two sources: a Hugging Face folder (llama, mistral, qwen2) of safetensors, one file or sharded with
model.safetensors.index.json, and a GGUF file of those families. Tensors come out under Hugging Face state-dict
names with the values transformers would load: safetensors ones in their stored float type (bf16 / fp16 stay
16-bit; the caller casts), GGUF ones dequantized to fp32 by the gguf package and reshaped / permuted by
transformers' own GGUF tensor processor (llama.cpp's q/k row permutation undone). Every check a user can act on
(missing shard or tensor, shape against the config, unsupported family or GGUF type) runs from headers, before
any tensor data is read. Never unpickles: a pytorch_model.bin-only folder is refused.

Memory: safetensors hands out views of a private, copy-on-write map of the shard (writing into one leaves the
file alone); its pages are read when touched and count in RSS only while the tensor lives. Each read opens the
file anew so that each tensor owns its map: a handle kept open would keep every page it ever touched resident.
A GGUF tensor is read with plain reads into its own buffer and dequantized from there (gguf's reader maps the
whole file). Either way, what a run holds is what it keeps alive.
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from compressor.atomic import sha256_file
from compressor.errors import UserError
from compressor.hf_offline import offline_transformers
from compressor.inputs.hf import (_cache_root, _gguf_file, _gguf_meta_model, _is_gguf, _meta_model,
                                  _read_hf_config, _renamer, _safetensors_header, _tied_groups,
                                  check_weights_match_config)
from passes.calibration import first_line

FAMILIES = ("llama", "mistral", "qwen2")  # the decoders the streamed KV-cache export takes
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SKELETON_MARKER = "gguf_source.json"  # written last in a skeleton folder: present = complete
DEQUANT_CHUNK = 1 << 22  # values dequantized at once (16 MB of fp32)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies and what reading it returns."""
    file: Path
    key: str  # the file's own name for it (safetensors key, GGUF tensor name)
    shape: tuple[int, ...]  # as tensor() returns it
    dtype: torch.dtype  # as tensor() returns it
    stored_bytes: int  # bytes read from the file for it
    offset: int = 0  # GGUF: absolute file offset of its data
    gguf_type: object = None  # GGUF: its GGMLQuantizationType
    raw: tuple = ()  # GGUF: (numpy dtype, numpy shape) of its stored data, as gguf's reader views it


@dataclass
class WeightStore:
    """A decoder's tensors by Hugging Face state-dict name, each read from disk when asked for."""
    path: Path
    config: object  # transformers PretrainedConfig
    tied: bool  # lm_head shares the embedding table (names() lists only the table)
    entries: dict[str, TensorEntry]
    reader: Callable[["TensorEntry"], torch.Tensor]
    bytes_read: int = 0  # stored bytes of the tensors handed out so far (a GGUF's blocks, not their fp32)
    _layers: dict[int, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in self.entries:
            match = LAYER_KEY.match(name)
            if match:
                self._layers.setdefault(int(match.group(1)), []).append(name)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def names(self) -> list[str]:
        """State-dict keys in model order (embedding, layers, final norm, head when untied)."""
        return list(self.entries)

    def _entry(self, name: str) -> TensorEntry:
        if name == HEAD and self.tied:
            name = EMBEDDING  # the tied head is the embedding table
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"{self.path} has no tensor {name}")
        return entry

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now (never cached). `lm_head.weight` of a tied model is the embedding."""
        entry = self._entry(name)
        tensor = self.reader(entry)
        self.bytes_read += entry.stored_bytes
        return tensor

    def layer_names(self, index: int) -> list[str]:
        if index not in self._layers:
            raise IndexError(f"{self.path} has no decoder layer {index} (it has {self.num_layers})")
        return self._layers[index]

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer `index`'s tensors keyed relative to it (`self_attn.q_proj.weight`)."""
        prefix = f"model.layers.{index}."
        return {name[len(prefix):]: self.tensor(name) for name in self.layer_names(index)}

    def tensor_bytes(self, name: str) -> int:
        """Bytes of the tensor tensor(name) returns (fp32 for GGUF), from headers alone."""
        entry = self._entry(name)
        return int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize

    def layer_bytes(self, index: int) -> int:
        return sum(self.tensor_bytes(name) for name in self.layer_names(index))

    def largest_layer_bytes(self) -> int:
        """The largest unit a streamed run holds at once, from headers alone: a decoder layer, or one of the
        tensors outside the layers (embedding table, final norm, untied head), each handled like a layer."""
        layers = [self.layer_bytes(index) for index in self._layers]
        others = [self.tensor_bytes(name) for name in self.entries if not LAYER_KEY.match(name)]
        return max(layers + others, default=0)


def open_weights(path: Path) -> WeightStore:
    """The weights of a Hugging Face decoder folder or a GGUF file (or a folder holding one), checked against
    the model's config from headers alone; no tensor data is read yet."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if _is_gguf(path):
        return _open_gguf(_gguf_file(path))
    if not path.is_dir():
        raise UserError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    return _open_safetensors(path)


def _check_family(model_type: str, where: Path) -> None:
    if model_type not in FAMILIES:
        raise UserError(f"{where}: model_type {model_type!r} cannot be streamed (streamed decoders: "
                        f"{', '.join(FAMILIES)})")


def _model_order(model: torch.nn.Module, tied: bool) -> list[str]:
    """The meta model's state-dict keys in its own order, the tied head left out."""
    return [name for name in model.state_dict() if not (tied and name == HEAD)]


def _is_tied(model: torch.nn.Module) -> bool:
    return any(HEAD in group and EMBEDDING in group for group in _tied_groups(model))


# safetensors reading

def _open_safetensors(folder: Path) -> WeightStore:
    record = _read_hf_config(folder)
    _check_family(record["model_type"], folder / "config.json")
    files, where = _safetensors_files(folder)
    transformers = offline_transformers()
    model = _meta_model(folder, transformers.AutoModelForCausalLM, transformers)
    stored, located = {}, {}  # key -> (dtype name, shape); key -> file
    for file in files:
        for key, info in _safetensors_header(file).items():
            stored[key], located[key] = info, file
    if where.name.endswith(".index.json"):
        _check_index(where, located)
    check_weights_match_config(model, stored, where, "config.json")
    tied = _is_tied(model)
    rename = _renamer(model, model.state_dict())
    by_name = {}
    for key in stored:
        name, converted = rename(key)
        if converted:  # a converter merges or splits tensors: not one tensor per read
            raise UserError(f"{where}: tensor {key} needs transformers' conversion to {name}; streaming reads "
                            f"tensors as stored")
        by_name[name] = key
    entries = {}
    for name in _model_order(model, tied):
        key = by_name[name]  # check_weights_match_config refused a missing one
        dtype_name, shape = stored[key]  # torch's spelling (SAFETENSORS_DTYPES), a float type (checked above)
        dtype = getattr(torch, dtype_name)
        entries[name] = TensorEntry(located[key], key, shape, dtype,
                                    int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return WeightStore(folder, model.config, tied, entries, _read_safetensors)


def _safetensors_files(folder: Path) -> tuple[list[Path], Path]:
    """The folder's safetensors files and the file that names them (the weights file or the index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single], single
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(str(shard) for shard in weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is not a weights index (a weight_map of tensor -> file; {first_line(exc)})") \
                from None
        files = []
        for shard in shards:
            file = folder / shard
            if file.resolve().parent != folder.resolve() or not file.is_file():
                raise UserError(f"{index} names the shard {shard!r}, which is not a file in {folder}")
            files.append(file)
        return files, index
    if any((folder / name).is_file() for name in PICKLED):
        raise UserError(f"{folder} holds only pytorch_model.bin weights, which streaming does not unpickle: save "
                        f"the model as safetensors (save_pretrained(..., safe_serialization=True))")
    raise UserError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def _check_index(index: Path, located: dict[str, Path]) -> None:
    """Each tensor the index names lies in the shard it names (a stale index would send reads elsewhere)."""
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for key, shard in weight_map.items():
        if key not in located:
            raise UserError(f"{index} names tensor {key} in {shard}, which does not hold it")
        if located[key].name != str(shard):
            raise UserError(f"{index} names tensor {key} in {shard}, but it lies in {located[key].name}")


def _read_safetensors(entry: TensorEntry) -> torch.Tensor:
    from safetensors import safe_open

    # a zero-copy view that keeps its own map of the file alive: freed with the tensor (see the module's docstring)
    with safe_open(str(entry.file), framework="pt") as handle:
        return handle.get_tensor(entry.key)


# GGUF reading

def _open_gguf(gguf: Path) -> WeightStore:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits, quant_shape_to_byte_shape
    from transformers.integrations import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    model = _gguf_meta_model(gguf)  # metadata -> config, tensors checked against it (names, types, sizes)
    config = model.config
    _check_family(config.model_type, gguf)
    architecture, keys, table = _gguf_table(gguf)
    # transformers' loader hands its tensor processor the config keys parsed from the metadata (the llama one
    # undoes llama.cpp's q/k permutation only when both head counts are there): the same keys, those present
    parsed = {hf: getattr(config, hf) for key, hf in GGUF_CONFIG_MAPPING.get(architecture, {}).items()
              if hf and f"{architecture}.{key}" in keys and hasattr(config, hf)}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    to_hf = gguf_hf_names(model, processor)
    expected = model.state_dict()
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    tied = _is_tied(model)
    found = {}
    for name_in_file, shape, type_id, offset, stored_bytes in table:
        name = to_hf.get(name_in_file)
        if name is None or (tied and name == HEAD):
            continue  # transformers skips what its mapping does not name (rope_freqs, ...)
        qtype = GGMLQuantizationType(type_id)
        if qtype not in readable:
            raise UserError(f"{gguf}: tensor {name_in_file} is stored as {qtype.name}, which the gguf package "
                            f"cannot dequantize")
        if shape != tuple(expected[name].shape):
            raise UserError(f"{gguf}: tensor {name_in_file} has shape {shape} where its metadata implies "
                            f"{tuple(expected[name].shape)}")
        # the stored data as gguf's reader views it: floats as such, blocks as rows of bytes
        raw = ((np.float32 if qtype == GGMLQuantizationType.F32 else np.float16, shape) if qtype in (
            GGMLQuantizationType.F32, GGMLQuantizationType.F16) else (np.uint8, quant_shape_to_byte_shape(shape, qtype)))
        found[name] = TensorEntry(gguf, name_in_file, shape, torch.float32, stored_bytes, offset, qtype, raw)
    missing = [name for name in _model_order(model, tied) if name not in found]
    if missing:  # _gguf_meta_model checked names by gguf's own map; this is transformers' map
        raise UserError(f"{gguf}: no tensor for {missing[0]}" + (f" (+{len(missing) - 1} more)" if missing[1:]
                                                                else ""))
    entries = {name: found[name] for name in _model_order(model, tied)}
    return WeightStore(gguf, config, tied, entries, _gguf_reader(processor))


def gguf_hf_names(model: torch.nn.Module, processor) -> dict[str, str]:
    """GGUF tensor name -> state-dict key, as transformers' get_gguf_hf_weights_map maps them. Its first pass
    only: the pass over submodules it adds (for models converted from a base model, e.g. Bloom) maps nothing new
    for llama / mistral / qwen2 (the tests compare the two), and redoes gguf's name map ~400 times (7 s on
    SmolLM2-135M)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_type = {"mistral": "llama"}.get(model.config.model_type, model.config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise UserError(f"the gguf package has no tensor names for {model_type!r}: update it (pip install -U gguf)")
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    mapping = {}
    for key in model.state_dict():
        key = processor.preprocess_name(key)
        stem, suffix = key.rsplit(".", 1) if key.endswith((".weight", ".bias")) else (key, None)
        found = names.get_name(stem)
        if found is not None:
            mapping[found + (f".{suffix}" if suffix else "")] = key
    return mapping


def _gguf_table(gguf: Path) -> tuple[str, set[str], list[tuple[str, tuple[int, ...], int, int, int]]]:
    """(architecture, metadata keys, [(tensor name, torch-order shape, ggml type, absolute offset, bytes)]):
    transformers' header reader where it has one (0.02 s on SmolLM2-135M: it skips the token strings), gguf's
    reader otherwise (3 s there: it parses every string)."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(gguf))
        header = GgufHeader.from_file(str(gguf))
        table = [(t.name, tuple(int(d) for d in t.shape), int(t.ggml_type), header.data_start + int(t.offset),
                  int(t.nbytes)) for t in header.tensors]
        return header.architecture, set(metadata), table
    except (ImportError, ValueError):  # ValueError: a tensor type it cannot size; gguf's reader sizes them all
        pass
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    table = [(t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset),
              int(t.n_bytes)) for t in reader.tensors]
    return reader.fields["general.architecture"].contents(), set(reader.fields), table


def _dequantize_rows(raw: np.ndarray, qtype, width: int) -> np.ndarray:
    """gguf.quants.dequantize a few rows at a time into one fp32 array: the same values (blocks lie along rows,
    each dequantized on its own), without its full-size temporaries (Qwen2.5-1.5B's Q6_K token table: 0.9 GB
    out, ~1 GB more in temporaries when done whole)."""
    from gguf.quants import dequantize

    rows = raw.reshape(-1, raw.shape[-1])
    out = np.empty((rows.shape[0], width), dtype=np.float32)
    step = max(1, DEQUANT_CHUNK // width)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], qtype)
    return out.reshape(*raw.shape[:-1], width)


def _gguf_reader(processor) -> Callable[[TensorEntry], torch.Tensor]:
    from gguf import GGMLQuantizationType

    def read(entry: TensorEntry) -> torch.Tensor:
        buffer = bytearray(entry.stored_bytes)
        # plain reads into our own buffer, not gguf's memory map: nothing of the file stays mapped afterwards
        with open(entry.file, "rb") as handle:
            handle.seek(entry.offset)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                count = handle.readinto(view[done:])
                if not count:
                    raise UserError(f"{entry.file} ends inside tensor {entry.key} (a truncated file)")
                done += count
        dtype, shape = entry.raw
        values = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        if entry.gguf_type != GGMLQuantizationType.F32:  # F32: the buffer is the tensor
            values = _dequantize_rows(values, entry.gguf_type, entry.shape[-1])
        values = processor.process(weights=values, name=entry.key).weights  # as transformers' loader does
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(entry.shape)

    return read


# skeleton folders

def skeleton_folder(path: Path) -> Path:
    """A folder with the model's config.json and tokenizer files: a Hugging Face folder is its own; for a GGUF,
    one made from its metadata once and cached (COMPRESSOR_CACHE, keyed by the file's sha256)."""
    path = Path(path)
    if not _is_gguf(path):
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no config.json (a Hugging Face model folder needs one)")
        return path
    gguf = _gguf_file(path)
    digest = sha256_file(gguf)
    folder = _cache_root() / "gguf-skeleton" / f"{gguf.stem}-{digest[:16]}"
    if (folder / SKELETON_MARKER).is_file():
        return folder
    transformers = offline_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise UserError(f"GGUF loading needs the gguf package: pip install 'compressor[hf]' ({exc})") from None
    except Exception as exc:  # the GGUF reader fails in many ways (struct, reshape, version): all mean "unreadable"
        raise UserError(f"{gguf} is not a GGUF decoder transformers can read ({first_line(exc, 200)})") from None
    scratch = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        config.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
        (scratch / SKELETON_MARKER).write_text(json.dumps({"file": gguf.name, "sha256": digest}) + "\n")
        _move_skeleton(scratch, folder)
    except OSError as exc:  # e.g. a full disk, a read-only cache
        raise UserError(f"cannot write the GGUF cache {folder}: {getattr(exc, 'strerror', None) or first_line(exc)} "
                        f"(free space there, or set COMPRESSOR_CACHE to another folder)") from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _move_skeleton(scratch: Path, folder: Path) -> None:
    """As hf.py's _move_into_place, with the skeleton's own completeness test (it has no model.safetensors):
    one another run put in place first is kept, a part-written one replaced."""
    try:
        os.replace(scratch, folder)
    except OSError:
        if (folder / SKELETON_MARKER).is_file():
            return
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)

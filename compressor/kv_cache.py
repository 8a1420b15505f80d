"""The KV-cache inputs of a decoder artifact (exporters.decoder_graph's, ONNX Runtime GenAI's names), as a
session lists them: what a full-sequence call feeds (an all-ones mask, empty pasts) and what each decode step
hands back (present.N.* becomes past_key_values.N.*), and whether the graph can keep its cache in one buffer."""
import json
from pathlib import Path

import numpy as np

from compressor.errors import UserError
from exporters import metadata_keys
from exporters.cache_in_place import IN_PLACE, PAST_PREFIX, PRESENT_PREFIX

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cache_inputs(session) -> list:
    return [arg for arg in session.get_inputs() if arg.name.startswith(PAST_PREFIX)]


def has_cache(session) -> bool:
    return bool(cache_inputs(session))


def past_name(present: str) -> str:
    return PAST_PREFIX + present[len(PRESENT_PREFIX):]


def _cache_shapes(session, batch: int, head_size: int | None, length: int) -> dict[str, tuple[tuple, type]]:
    def dim(value):
        if isinstance(value, int):
            return value
        if head_size is None:
            raise UserError(f"the graph's cache inputs leave their head size symbolic ({value!r}) and no "
                            f"genai_config.json beside it says it (model.decoder.head_size)")
        return head_size

    return {arg.name: ((batch, dim(arg.shape[1]), length, dim(arg.shape[3])), NUMPY_TYPES[arg.type])
            for arg in cache_inputs(session)}


def empty_cache(session, batch: int, head_size: int | None = None, length: int = 0) -> dict[str, np.ndarray]:
    """Zero pasts [batch, kv_heads, length, head_dim]. Zero-length ones make a call a prefill; `length` > 0 is
    the one buffer of a cache kept in place (exporters.cache_in_place). `head_size` stands in where the graph
    leaves that dimension symbolic (Model Builder's graphs do; genai_config.json has it)."""
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in
            _cache_shapes(session, batch, head_size, length).items()}


def cache_bytes(session, batch: int, head_size: int | None = None, length: int = 1) -> int:
    """What empty_cache(session, batch, head_size, length) would allocate, without allocating it."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for shape, dtype in _cache_shapes(session, batch, head_size, length).values())


def complete_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full-sequence feed ({input_ids}) made whole for a cache graph: mask of ones, empty pasts."""
    if not has_cache(session):
        return feeds
    ids = feeds["input_ids"]
    return {"attention_mask": np.ones(ids.shape, np.int64), **empty_cache(session, ids.shape[0]), **feeds}


def genai_config(folder: Path | None) -> dict:
    """The folder's genai_config.json (ONNX Runtime GenAI's description of a model folder), or {}."""
    try:
        config = json.loads((Path(folder) / "genai_config.json").read_text()) if folder else {}
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting too deep to be a genai_config.json
        return {}
    return config if isinstance(config, dict) else {}


MAX_HEAD_SIZE = 1024  # a bound on what genai_config.json may say (the largest heads in use hold 256)


def genai_head_size(folder: Path | None) -> int | None:
    """Model Builder's graphs leave the cache's head size symbolic; their genai_config.json says it. It sizes the
    cache buffers, so it is held to 1..MAX_HEAD_SIZE."""
    try:
        value = genai_config(folder)["model"]["decoder"]["head_size"]
    except (KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_HEAD_SIZE:
        raise UserError(f"{Path(folder) / 'genai_config.json'}: model.decoder.head_size must be an integer in "
                        f"1..{MAX_HEAD_SIZE:,}, not {str(value)[:40]}")
    return value


def keeps_cache_in_place(session, folder: Path | None = None) -> bool:
    """Whether to give this session one cache buffer for past and present: our exports say so in their metadata
    (exporters.cache_in_place); another tool's folder through its genai_config.json (Model Builder's)."""
    if session.get_modelmeta().custom_metadata_map.get(metadata_keys.KV_CACHE) == IN_PLACE:
        return True
    try:
        return genai_config(folder)["search"]["past_present_share_buffer"] is True
    except (KeyError, TypeError):
        return False

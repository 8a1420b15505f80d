"""The KV-cache inputs of a decoder artifact (exporters.decoder_graph's, ONNX Runtime GenAI's names), as a
session lists them: what a full-sequence call feeds (an all-ones mask, empty pasts) and what each decode step
hands back (present.N.* becomes past_key_values.N.*)."""
import numpy as np

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cache_inputs(session) -> list:
    return [arg for arg in session.get_inputs() if arg.name.startswith(PAST_PREFIX)]


def has_cache(session) -> bool:
    return bool(cache_inputs(session))


def past_name(present: str) -> str:
    return PAST_PREFIX + present[len(PRESENT_PREFIX):]


def empty_cache(session, batch: int, head_size: int | None = None) -> dict[str, np.ndarray]:
    """Zero-length pasts [batch, kv_heads, 0, head_dim]: a call with them is a prefill. `head_size` stands in
    where the graph leaves that dimension symbolic (Model Builder's graphs do; genai_config.json has it)."""
    def dim(value):
        if isinstance(value, int):
            return value
        if head_size is None:
            raise ValueError(f"the cache input's dimension {value!r} is symbolic: give its size")
        return head_size

    return {arg.name: np.zeros((batch, dim(arg.shape[1]), 0, dim(arg.shape[3])), NUMPY_TYPES[arg.type])
            for arg in cache_inputs(session)}


def complete_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full-sequence feed ({input_ids}) made whole for a cache graph: mask of ones, empty pasts."""
    if not has_cache(session):
        return feeds
    ids = feeds["input_ids"]
    return {"attention_mask": np.ones(ids.shape, np.int64), **empty_cache(session, ids.shape[0]), **feeds}

"""Generation from a decoder artifact under ONNX Runtime with its KV cache: one prefill over the prompt, then one
token per step, each step feeding the last step's present.N.* back as past_key_values.N.*.

Where the graph keeps its cache in place (GroupQueryAttention: our exports, Model Builder's), past and present
are one bound buffer per layer for the whole generation (I/O binding), as ONNX Runtime GenAI runs it; on CUDA
the cache never leaves the device either way. Only the logits come back to pick a token.
"""
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compressor.errors import UserError
from compressor.kv_cache import PRESENT_PREFIX, empty_cache, has_cache, past_name
from exporters import metadata_keys

IN_PLACE_BYTES = 2**31  # the most an in-place cache allocates before the first token


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise UserError(f"--temperature must be a finite number >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], not {self.top_p}")


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # the new tokens, prompt excluded
    prefill_ms: float = 0.0  # prompt in, first new token chosen
    step_ms: list[float] = field(default_factory=list)  # each later token

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.step_ms) / (sum(self.step_ms) / 1e3) if self.step_ms else 0.0


def max_positions(session) -> int | None:
    """The longest total sequence the artifact takes (its position table / rotary cache), from its metadata."""
    config = session.get_modelmeta().custom_metadata_map.get(metadata_keys.MODEL_CONFIG)
    try:
        config = json.loads(config) if config else {}
    except ValueError:
        return None
    value = config.get("max_positions", config.get("context"))
    return int(value) if isinstance(value, int) and value > 0 else None


def vocab_size(session) -> int:
    return int(session.get_outputs()[0].shape[-1])


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    logits = logits.astype(np.float64)
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k:
        cut = np.partition(logits, -min(sampling.top_k, logits.size))[-min(sampling.top_k, logits.size)]
        logits = np.where(logits < cut, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # the smallest set reaching top_p
        mask = np.zeros_like(probs, bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class _Step:
    """I/O binding: the cache stays where the provider computes (on CUDA it never leaves the device); only the
    logits come back. With `length` (a graph that keeps its cache in place: exporters.cache_in_place) each
    layer's past and present are one buffer of that many positions for the whole generation, as ONNX Runtime
    GenAI runs them: no step copies the cache. Without, each step's presents are bound as the next's pasts."""

    def __init__(self, session, device: str, head_size: int | None, length: int | None):
        import onnxruntime as ort

        self.session, self.device, self.in_place = session, device, length is not None
        self.outputs = [o.name for o in session.get_outputs()]
        self.past = {name: ort.OrtValue.ortvalue_from_numpy(value, device, 0)
                     for name, value in empty_cache(session, 1, head_size, length or 0).items()}

    def __call__(self, ids: np.ndarray, total: int) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        for name, value in self.past.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            if self.in_place and name.startswith(PRESENT_PREFIX):
                binding.bind_ortvalue_output(name, self.past[past_name(name)])
            else:
                binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        if not self.in_place:
            self.past = {past_name(n): v for n, v in zip(self.outputs, values) if n.startswith(PRESENT_PREFIX)}
        return values[0].numpy()[0, -1]


def require_cache(session) -> None:
    if not has_cache(session):
        raise UserError("this artifact has no KV cache (no past_key_values inputs): it is not a decoder export "
                        "that generates; re-run `compress run` on its checkpoint with this version")


def generate(session, prompt: list[int], max_new_tokens: int, provider: str = "cpu", sampling: Sampling = Sampling(),
             stop_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None,
             head_size: int | None = None, in_place: bool = False) -> Generation:
    """New tokens after `prompt` (at most `max_new_tokens`; fewer where a stop token or the artifact's position
    limit comes first), with timings. `head_size`: for graphs whose cache inputs leave it symbolic. `in_place`:
    the graph keeps its cache in one buffer (compressor.kv_cache.keeps_cache_in_place); the same tokens, no
    copy of the cache per step."""
    require_cache(session)
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    limit = max_positions(session)
    if limit is not None and len(prompt) >= limit:
        raise UserError(f"the prompt has {len(prompt)} tokens; this model takes at most {limit} in all")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - len(prompt))
    length = len(prompt) + max_new_tokens
    if in_place and sum(a.nbytes for a in empty_cache(session, 1, head_size, 1).values()) * length > IN_PLACE_BYTES:
        in_place = False  # a buffer that large up front (a graph with no position limit): grow it step by step
    step = _Step(session, provider, head_size, length if in_place else None)
    rng = np.random.default_rng(sampling.seed)
    result = Generation()
    ids, total = np.asarray([prompt], np.int64), len(prompt)
    for index in range(max_new_tokens):
        start = time.perf_counter()
        token = _choose(step(ids, total), sampling, rng)
        elapsed = (time.perf_counter() - start) * 1e3
        if index == 0:
            result.prefill_ms = elapsed
        else:
            result.step_ms.append(elapsed)
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            break
        ids, total = np.asarray([[token]], np.int64), total + 1
    return result


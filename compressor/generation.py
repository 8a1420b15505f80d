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
from pathlib import Path

import numpy as np

from compressor.errors import UserError
from compressor.kv_cache import PRESENT_PREFIX, cache_bytes, empty_cache, genai_head_size, has_cache, past_name
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


# ops that take input_ids unchanged on their way to the token table (Model Builder casts them to int32)
PASS_THROUGH = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
TABLE_LOOKUPS = {"Gather": "axis", "GatherBlockQuantized": "gather_axis"}  # op -> its gather-axis attribute
ROTARY_CACHE_INPUTS = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}  # com.microsoft op -> its cos_cache input
TABLE_SOURCES = ("DequantizeLinear", "Cast", "Identity")  # a table gathered from these is its input's size


@dataclass(frozen=True)
class GraphLimits:
    """What the graph itself can take: token ids below `vocab` (the rows of the table input_ids indexes: out of
    range, GatherBlockQuantized returns a zero row and Gather fails) and at most `positions` tokens in all (the
    rows of its position table or rotary cache). Each with where it was read (for messages); None where the
    graph says nothing of it."""
    vocab: int | None = None
    vocab_source: str = ""
    positions: int | None = None
    positions_source: str = ""


def _attribute(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def graph_limits_of(proto) -> GraphLimits:
    """The token table input_ids reads (through casts and reshapes) and the position tables: GroupQueryAttention's
    or RotaryEmbedding's cos cache, or a 2-D table gathered by positions the graph computes."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    consumers: dict[str, list] = {}
    producers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        producers.update((name, node) for name in node.output)

    def table(name: str) -> str:
        """The initializer a gathered table is, or is dequantized or cast from (a k-bit table read whole)."""
        for _ in range(4):
            node = producers.get(name)
            if name in shapes or node is None or node.op_type not in TABLE_SOURCES or not node.input:
                break
            name = node.input[0]
        return name

    def table_rows(node, indices: str) -> tuple[int, str] | None:
        """Rows of the table `node` gathers by `indices` along its gather axis."""
        if node.op_type not in TABLE_LOOKUPS or len(node.input) < 2 or node.input[1] != indices:
            return None
        name = table(node.input[0])
        dims = shapes.get(name)
        axis = _attribute(node, TABLE_LOOKUPS[node.op_type], 0)
        return (dims[axis], name) if dims and -len(dims) <= axis < len(dims) else None

    token_tables, ids, seen = [], ["input_ids"], set()
    while ids:  # from input_ids through pass-through ops to the lookups that read it
        name = ids.pop()
        for node in consumers.get(name, ()):
            if node.op_type in PASS_THROUGH and node.name not in seen:
                seen.add(node.name)
                ids.extend(node.output[:1])
            elif (found := table_rows(node, name)) is not None:
                token_tables.append((found, node.name))
    token_nodes = {node_name for _, node_name in token_tables}
    position_tables = []
    for node in proto.graph.node:
        if node.op_type in ROTARY_CACHE_INPUTS and _attribute(node, "do_rotary", 1):
            index = ROTARY_CACHE_INPUTS[node.op_type]
            if len(node.input) > index and shapes.get(node.input[index]):
                position_tables.append((shapes[node.input[index]][0], node.input[index]))
        elif node.name not in token_nodes and len(node.input) > 1 and len(shapes.get(table(node.input[0]), ())) == 2 \
                and (found := table_rows(node, node.input[1])) is not None:
            position_tables.append(found)  # a learned position table, gathered by positions computed in the graph
    vocab, table = min((found for found, _ in token_tables), default=(None, ""))
    vocab_source = f"the rows of its token table {table}"
    if vocab is None:  # no table found: the logits' width bounds the ids all the same
        vocab = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value or None if proto.graph.output else None
        vocab_source = "the width of its logits"
    positions, table = min(position_tables, default=(None, ""))
    positions_source = f"the rows of {table}"
    if positions is None:  # no position table (a full-sequence export): the limit its metadata states
        positions, positions_source = _metadata_positions(proto), f"its {metadata_keys.MODEL_CONFIG} max_positions"
    return GraphLimits(vocab, vocab_source, positions, positions_source)


def read_graph_limits(model) -> GraphLimits:
    """graph_limits_of a model file (or serialized bytes), read without its external data."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if not isinstance(model, bytes) else \
        onnx.load_from_string(model)
    return graph_limits_of(proto)


def _made_from(session) -> str | bytes | None:
    """The model file (or bytes) a session was made from: onnxruntime keeps it, though not as public API (without
    it, nothing more is known than the session says)."""
    return getattr(session, "_model_path", None) or getattr(session, "_model_bytes", None)


def graph_limits(session) -> GraphLimits:
    """GraphLimits of the model a session runs, read from the file or bytes it was made from."""
    model = _made_from(session)
    try:
        return read_graph_limits(model) if model else GraphLimits()
    except Exception:  # noqa: BLE001  (the session loaded it: a file changed since is read as no graph)
        return GraphLimits()


def _metadata_positions(proto) -> int | None:
    config = next((p.value for p in proto.metadata_props if p.key == metadata_keys.MODEL_CONFIG), None)
    try:
        config = json.loads(config) if config else {}
    except (ValueError, RecursionError):
        return None
    value = config.get("max_positions", config.get("context")) if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_prompt(prompt: list[int], limits: GraphLimits) -> None:
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    if limits.vocab is not None:
        outside = [t for t in prompt if not 0 <= t < limits.vocab]
        if outside:
            raise UserError(f"the prompt holds token id {outside[0]}, outside this model's vocabulary of "
                            f"{limits.vocab:,} ({limits.vocab_source}): was it encoded with another model's "
                            f"tokenizer?")
    if limits.positions is not None and len(prompt) >= limits.positions:
        raise UserError(f"the prompt has {len(prompt)} tokens; this model takes at most {limits.positions} in all "
                        f"({limits.positions_source})")


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    logits = logits.astype(np.float64)
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):  # max 0 first: a tiny temperature sends the rest to -inf, never to NaN
        logits = (logits - logits.max()) / sampling.temperature
    if sampling.top_k:
        cut = np.partition(logits, -min(sampling.top_k, logits.size))[-min(sampling.top_k, logits.size)]
        logits = np.where(logits < cut, -np.inf, logits)
    probs = np.exp(logits)
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
             head_size: int | None = None, in_place: bool = False, limits: GraphLimits | None = None) -> Generation:
    """New tokens after `prompt` (at most `max_new_tokens`; fewer where a stop token or the artifact's position
    limit comes first), with timings. `head_size`: for graphs whose cache inputs leave it symbolic. `in_place`:
    the graph keeps its cache in one buffer (compressor.kv_cache.keeps_cache_in_place); the same tokens, no
    copy of the cache per step. `limits`: the graph's (graph_limits(session), read here when not given); ids
    and lengths past them are refused, not run."""
    require_cache(session)
    limits = limits or graph_limits(session)
    if head_size is None and isinstance(_made_from(session), str):  # Model Builder's graphs leave it symbolic
        head_size = genai_head_size(Path(_made_from(session)).parent)
    check_prompt(prompt, limits)
    if limits.positions is not None:
        max_new_tokens = min(max_new_tokens, limits.positions - len(prompt))
    length = len(prompt) + max_new_tokens
    if in_place and cache_bytes(session, 1, head_size, length) > IN_PLACE_BYTES:
        in_place = False  # a buffer that large up front (a graph with no position limit): grow it step by step
    step = _Step(session, provider, head_size, length if in_place else None)
    rng = np.random.default_rng(sampling.seed)
    result = Generation()
    ids, total = np.asarray([prompt], np.int64), len(prompt)
    for index in range(max_new_tokens):
        start = time.perf_counter()
        token = _choose(step(ids, total), sampling, rng)
        if limits.vocab is not None and token >= limits.vocab:  # its logits are wider than its token table
            raise UserError(f"the model chose token id {token}, outside its vocabulary of {limits.vocab:,} "
                            f"({limits.vocab_source}): its head and its token table disagree")
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


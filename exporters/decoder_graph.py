"""A decoder LM written op by op as one ONNX graph that prefills and decodes with a KV cache.

Its inputs and outputs are ONNX Runtime GenAI's (Model Builder's), so the same file runs under our own loop and
under onnxruntime_genai:
  input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64,
  past_key_values.N.key / .value [batch, kv_heads, past_sequence, head_dim]
  -> logits [batch, sequence, vocab], present.N.key / .value [batch, kv_heads, total_sequence, head_dim].
A full-sequence call (what perplexity needs) is a prefill with empty pasts.

The ops are those ONNX Runtime has fused kernels for (../shared/notes/ort-facts.md): com.microsoft
GroupQueryAttention (causal attention over the cache, grouped KV heads, rotary embeddings inside),
SkipLayerNormalization / SkipSimplifiedLayerNormalization for each residual add + norm, Gelu / BiasGelu.
Every Linear is MatMul(x, `<module>.weight` [K, N]) (+ Add bias), as exporters.onnx_export names them, so
exporters.qdq places the quantize pass's records by name and ONNX Runtime fuses DequantizeLinear + MatMul into
MatMulNBits. A tied LM head reads Transpose(table), stored once.

Why not torch.onnx.export with a cache: Hugging Face's cache classes export differently per family and
version, and the attention they export is a MatMul/Softmax chain ONNX Runtime runs unfused; writing the graph
from the weights gives one layout for our GPT samples and the Llama family alike.
"""
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.onnx_export import IR_VERSION, OPSET, ExportError

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
# The rotary cos and sin tables are built whole at export ([max_positions, head_dim / 2] fp32 each): 1 GiB for the
# pair takes 2,097,152 positions at head_dim 128 (the longest-context Llama / Qwen2 configs hold about 1M).
MAX_ROTARY_TABLE_BYTES = 1 << 30


def rotary_table_bytes(max_positions: int, rotary_dims: int) -> int:
    """Bytes of the cos and sin tables for `max_positions` positions of `rotary_dims` (head_dim / 2) frequencies."""
    return 2 * max_positions * rotary_dims * np.dtype(np.float32).itemsize


def max_rotary_positions(rotary_dims: int) -> int:
    return MAX_ROTARY_TABLE_BYTES // rotary_table_bytes(1, rotary_dims)


@dataclass
class Linear:
    name: str  # the torch module path; its MatMul initializer is `<name>.weight`
    weight: np.ndarray  # [out, in], as torch stores it
    bias: np.ndarray | None = None


@dataclass
class Norm:
    name: str
    weight: np.ndarray
    bias: np.ndarray | None  # None: RMSNorm
    eps: float


@dataclass
class DecoderLayer:
    attn_norm: Norm
    q: list[Linear]  # a chain: one Linear, or a low-rank pair (down, up)
    k: list[Linear]
    v: list[Linear]
    o: list[Linear]
    heads: int
    kv_heads: int
    head_dim: int
    mlp_norm: Norm
    mlp: dict[str, list[Linear]]  # {"gate", "up", "down"} (gated) or {"up", "down"}
    activation: str  # one of ACTIVATIONS


@dataclass
class Decoder:
    vocab_size: int
    max_positions: int  # the position tables' length: the longest total sequence the graph takes
    embed_name: str  # the token table's parameter name (a tied head reads it too)
    embed: np.ndarray  # [vocab, width]
    layers: list[DecoderLayer]
    final_norm: Norm
    lm_head: list[Linear] | None  # None: tied to the token table
    positions: np.ndarray | None = None  # learned position table [max_positions, width]
    positions_name: str = "positions.weight"
    rotary_inv_freq: np.ndarray | None = None  # rotary embeddings (inside GroupQueryAttention)
    rotary_scaling: float = 1.0


class Graph:
    """Nodes and initializers as they are written; `count` numbers the nodes (a streamed writer starts a part of
    the graph where the part before it stopped)."""

    def __init__(self, count: int = 0):
        self.nodes, self.inits, self.count = [], [], count

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        self.count += 1
        name = f"/{op}_{self.count}"
        names = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain or None, **attrs))
        return names

    def one(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.node(op, inputs, 1, domain, **attrs)[0]


def _linear_chain(g: Graph, x: str, chain: list[Linear]) -> str:
    for linear in chain:
        # one transposed copy (astype of the transposed view, then from_array's contiguous copy, made two)
        weight = np.ascontiguousarray(linear.weight.T, dtype=np.float32)
        x = g.one("MatMul", [x, g.init(f"{linear.name}.weight", weight)])
        del weight
        if linear.bias is not None:
            x = g.one("Add", [x, g.init(f"{linear.name}.bias", linear.bias.astype(np.float32))])
    return x


def _norm_params(g: Graph, norm: Norm) -> list[str]:
    names = [g.init(f"{norm.name}.weight", norm.weight.astype(np.float32))]
    if norm.bias is not None:
        names.append(g.init(f"{norm.name}.bias", norm.bias.astype(np.float32)))
    return names


def _norm(g: Graph, x: str, norm: Norm) -> str:
    params = _norm_params(g, norm)
    if norm.bias is not None:
        return g.one("LayerNormalization", [x, *params], axis=-1, epsilon=norm.eps)
    # RMSNorm from plain ops (the default domain has no RMS op at opset 21); ONNX Runtime fuses it into
    # SimplifiedLayerNormalization at session start
    mean_square = g.one("ReduceMean", [g.one("Mul", [x, x]), g.init(f"{norm.name}.axes", np.array([-1], np.int64))],
                        keepdims=1)
    eps = g.init(f"{norm.name}.eps", np.array(norm.eps, np.float32))
    return g.one("Mul", [g.one("Div", [x, g.one("Sqrt", [g.one("Add", [mean_square, eps])])]), params[0]])


def _skip_norm(g: Graph, x: str, residual: str, norm: Norm) -> tuple[str, str]:
    """(norm(x + residual), x + residual) in one fused op."""
    params = _norm_params(g, norm)
    if norm.bias is not None:
        out = g.node("SkipLayerNormalization", [x, residual, *params], 4, "com.microsoft", epsilon=norm.eps)
    else:
        out = g.node("SkipSimplifiedLayerNormalization", [x, residual, *params], 4, "com.microsoft",
                     epsilon=norm.eps)
    return out[0], out[3]


def _mlp(g: Graph, x: str, layer: DecoderLayer) -> str:
    up = layer.mlp["up"]
    if layer.activation == "gelu" and up[-1].bias is not None:  # bias + erf GELU in one kernel
        last = up[-1]
        h = _linear_chain(g, x, up[:-1] + [Linear(last.name, last.weight, None)])
        h = g.one("BiasGelu", [h, g.init(f"{last.name}.bias", last.bias.astype(np.float32))], "com.microsoft")
    else:
        h = _linear_chain(g, x, up if "gate" not in layer.mlp else layer.mlp["gate"])
        if layer.activation == "gelu":
            h = g.one("Gelu", [h], "com.microsoft")
        elif layer.activation == "gelu_tanh":
            h = g.one("FastGelu", [h], "com.microsoft")
        elif layer.activation == "relu":
            h = g.one("Relu", [h])
        else:  # silu
            h = g.one("Mul", [h, g.one("Sigmoid", [h])])
        if "gate" in layer.mlp:
            h = g.one("Mul", [h, _linear_chain(g, x, up)])
    return _linear_chain(g, h, layer.mlp["down"])


def _rotary_caches(g: Graph, decoder: Decoder) -> tuple[str, str]:
    dims = len(decoder.rotary_inv_freq)
    if decoder.max_positions > max_rotary_positions(dims):  # the input adapter refuses such configs first
        raise ExportError(f"max_positions {decoder.max_positions:,} needs rotary tables of "
                          f"{rotary_table_bytes(decoder.max_positions, dims) / 2**30:.2f} GiB; at most "
                          f"{max_rotary_positions(dims):,} positions ({MAX_ROTARY_TABLE_BYTES / 2**30:g} GiB)")
    positions = np.arange(decoder.max_positions, dtype=np.float32)
    freqs = np.outer(positions, decoder.rotary_inv_freq.astype(np.float32))  # [max_positions, head_dim / 2]
    cos = np.cos(freqs)
    cos *= np.float32(decoder.rotary_scaling)
    sin = np.sin(freqs, out=freqs)  # one table's memory less at the peak
    sin *= np.float32(decoder.rotary_scaling)
    return g.init("rotary.cos_cache", cos), g.init("rotary.sin_cache", sin)


@dataclass
class Flow:
    """The tensors one part of the graph hands the next: the stream not yet normalized (`x`, the last sublayer's
    output) and the residual it adds to (None before the first layer), plus what every attention reads."""
    x: str
    residual: str | None
    seqlens_k: str
    total_length: str
    cos_cache: str = ""
    sin_cache: str = ""
    rotary: bool = False


def decoder_io(decoder: Decoder, layers: list[tuple[int, int]]) -> tuple[list, list]:
    """The graph's inputs and outputs; `layers`: each layer's (kv_heads, head_dim)."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", decoder.vocab_size])]
    for index, (kv_heads, head_dim) in enumerate(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                PAST.format(index, kind), TensorProto.FLOAT, ["batch", kv_heads, "past_sequence", head_dim]))
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(
                PRESENT.format(index, kind), TensorProto.FLOAT, ["batch", kv_heads, "total_sequence", head_dim]))
    return inputs, outputs


def prologue_nodes(g: Graph, decoder: Decoder) -> Flow:
    """The token (and position) lookup, the mask's views and the rotary tables: everything before layer 0."""
    one = g.init("const.one", np.array([1], np.int64))
    # GroupQueryAttention's view of the mask: per row, the index of the last real token; and the total length
    seqlens_k = g.one("Cast", [g.one("Sub", [g.one("ReduceSum", ["attention_mask", one], keepdims=0), one])],
                      to=TensorProto.INT32)
    total_length = g.one("Cast", [g.one("Gather", [g.one("Shape", ["attention_mask"]),
                                                   g.init("const.index1", np.array(1, np.int64))], axis=0)],
                         to=TensorProto.INT32)
    x = g.one("Gather", [g.init(decoder.embed_name, np.asarray(decoder.embed, dtype=np.float32)), "input_ids"], axis=0)
    if decoder.positions is not None:
        # position of each new token = (real tokens up to and including it) - 1, so left padding is honoured
        cumulative = g.one("Sub", [g.one("CumSum", ["attention_mask", g.init("const.axis1", np.array(1, np.int64))]),
                                   one])
        new_tokens = g.one("Gather", [g.one("Shape", ["input_ids"]), g.init("const.index1_1d", np.array([1], np.int64))],
                           axis=0)
        positions = g.one("Slice", [cumulative, g.one("Neg", [new_tokens]),
                                    g.init("const.end", np.array([np.iinfo(np.int64).max], np.int64)), one])
        positions = g.one("Max", [positions, g.init("const.zero", np.array(0, np.int64))])
        table = g.init(decoder.positions_name, np.asarray(decoder.positions, dtype=np.float32))
        x = g.one("Add", [x, g.one("Gather", [table, positions], axis=0)])
    flow = Flow(x, None, seqlens_k, total_length)
    if decoder.rotary_inv_freq is not None:
        flow.cos_cache, flow.sin_cache = _rotary_caches(g, decoder)
        flow.rotary = True
    return flow


def layer_nodes(g: Graph, index: int, layer: DecoderLayer, flow: Flow) -> Flow:
    """Layer `index`: its input norm (fused with the residual add of the layer before), attention over the cache,
    the MLP; returns the MLP's output and the residual, not yet added."""
    if flow.residual is None:
        residual, hidden = flow.x, _norm(g, flow.x, layer.attn_norm)
    else:
        hidden, residual = _skip_norm(g, flow.x, flow.residual, layer.attn_norm)
    past = [PAST.format(index, kind) for kind in ("key", "value")]
    present = [PRESENT.format(index, kind) for kind in ("key", "value")]
    q, k, v = (_linear_chain(g, hidden, chain) for chain in (layer.q, layer.k, layer.v))
    attention = g.node(
        "GroupQueryAttention", [q, k, v, *past, flow.seqlens_k, flow.total_length, flow.cos_cache, flow.sin_cache],
        [f"/layers.{index}/attention", *present], "com.microsoft", num_heads=layer.heads,
        kv_num_heads=layer.kv_heads, do_rotary=int(flow.rotary), rotary_interleaved=0,
        scale=float(layer.head_dim ** -0.5), local_window_size=-1)[0]
    hidden, residual = _skip_norm(g, _linear_chain(g, attention, layer.o), residual, layer.mlp_norm)
    return Flow(_mlp(g, hidden, layer), residual, flow.seqlens_k, flow.total_length, flow.cos_cache,
                flow.sin_cache, flow.rotary)


def head_nodes(g: Graph, decoder: Decoder, flow: Flow) -> None:
    """The final norm (fused with the last residual add) and the LM head, whose output is `logits`."""
    hidden, _ = _skip_norm(g, flow.x, flow.residual, decoder.final_norm)
    if decoder.lm_head is None:
        table_t = g.one("Transpose", [decoder.embed_name], perm=[1, 0])
        g.nodes.append(helper.make_node("MatMul", [hidden, table_t], ["logits"], name="/lm_head/MatMul"))
    else:
        out = _linear_chain(g, hidden, decoder.lm_head)
        g.nodes.append(helper.make_node("Identity", [out], ["logits"], name="/lm_head/Identity"))


def decoder_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="compressor")
    proto.ir_version = IR_VERSION
    return proto


def build_decoder_graph(decoder: Decoder) -> onnx.ModelProto:
    """The fp32 graph (ir_version 10, opset 21 + com.microsoft); exporters.onnx_export.finalize completes it."""
    g = Graph()
    flow = prologue_nodes(g, decoder)
    inputs, outputs = decoder_io(decoder, [(layer.kv_heads, layer.head_dim) for layer in decoder.layers])
    for index, layer in enumerate(decoder.layers):
        flow = layer_nodes(g, index, layer, flow)
    head_nodes(g, decoder, flow)
    return decoder_model(helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits))

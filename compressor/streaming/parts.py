"""The parts of a streamed run (compressor.streaming.run orders them): part 0, the token table (with a tied head);
one part per decoder layer; the last part, the final norm and an untied head. Each part's torch passes run on a
module of its own with the activations that reach it; its piece of the graph is lowered and appended to the data
file; the activations move on through it."""
import dataclasses
import math

import numpy as np
import onnx
import torch
from onnx import TensorProto

from compressor.errors import UserError
from compressor.recipes import Recipe
from compressor.streaming.layers import EndsModel, Family, LayerModel
from compressor.streaming.weights import EMBEDDING, HEAD, WeightStore
from compressor.tasks import measure
from exporters.decoder_graph import PRESENT, Flow, Graph, head_nodes, layer_nodes, prologue_nodes
from exporters.onnx_export import ExportError
from exporters.qdq import LoweringError
from exporters.streamed_writer import ExternalData, Part, lower_part, write_part
from passes.model_bits import total_model_bits
from passes.registry import GRAPH, PASSES, TORCH

HEAD_INPUTS = ("/head/x", "/head/residual")  # what a tied head reads, until the last layer's outputs are known
FORWARD_BATCH = 8  # windows per forward call through one layer


@torch.no_grad()
def forward(model: torch.nn.Module, hidden: torch.Tensor) -> None:
    """`hidden` replaced by the model's output, FORWARD_BATCH windows at a time (in place: no second copy)."""
    for start in range(0, len(hidden), FORWARD_BATCH):
        hidden[start:start + FORWARD_BATCH] = model(hidden[start:start + FORWARD_BATCH])


def run_passes(model: torch.nn.Module, recipe: Recipe, calibration: torch.Tensor | None,
                batch: int) -> tuple[dict, dict]:
    """The recipe's torch passes on one part, each given its calibration_samples windows in batches of `batch`;
    (records by pass, the quantize pass's records by module)."""
    records, quantized = {}, {}
    for name, config in recipe.passes:
        spec = PASSES[name]
        if spec.rewrites != TORCH:
            continue
        if spec.select is not None:
            try:
                spec.select(model, config)
            except ValueError:
                continue  # nothing of this part is the pass's (e.g. a head the recipe ignores)
        batches = None
        if config.needs_calibration:
            hidden = calibration[:config.calibration_samples]
            batches = [(hidden[i:i + batch],) for i in range(0, len(hidden), batch)]
        try:
            record = spec.run(model, config, batches, False)
        except ValueError as exc:
            raise UserError(f"{name}: {exc}") from None
        quantized.update(record.pop("quantized", {}))
        records[name] = record
    return records, quantized


def graph_passes(recipe: Recipe):
    graph_passes = [(name, config) for name, config in recipe.passes if PASSES[name].rewrites == GRAPH]

    def run(proto: onnx.ModelProto) -> onnx.ModelProto:
        if not graph_passes:
            return proto
        import onnx_ir as ir

        model = ir.serde.deserialize_model(proto)
        for name, config in graph_passes:
            PASSES[name].run(model, config, None, False)
        return ir.serde.serialize_model(model)
    return run


def lowered_part(nodes, inits, outputs: list[str], quantized: dict, recipe: Recipe, flow: dict,
                  data: ExternalData) -> Part:
    types = {flow["seqlens_k"]: TensorProto.INT32, flow["total_length"]: TensorProto.INT32}
    try:
        proto, lowered = lower_part(nodes, inits, outputs, quantized if recipe.passes else None, recipe.export.dtype,
                                    graph_passes(recipe), types)
    except (ExportError, LoweringError) as exc:
        raise UserError(str(exc)) from None
    return write_part(proto, lowered, data)


def layer_part(store: WeightStore, index: int, family: Family, recipe: Recipe, streams: dict, state: dict,
                data: ExternalData):
    model = LayerModel(family, index, store.layer(index))
    forward(model, streams["reference"])  # the layer as given
    records, quantized = run_passes(model, recipe, streams.get("calibration"), FORWARD_BATCH)
    if "calibration" in streams:
        forward(model, streams["calibration"])  # what the next layer's passes see: this layer compressed
    forward(model, streams["compressed"])
    bits = total_model_bits(model, quantized, float_bits=recipe.export.float_bits)
    described = model.describe(family.activation)
    del model
    state["layer_shapes"].append([described.kv_heads, described.head_dim])
    g = Graph(state["node_count"])
    after = layer_nodes(g, index, described, Flow(**state["flow"]))
    del described  # the graph holds the weights now
    outputs = [after.x, after.residual, *(PRESENT.format(index, kind) for kind in ("key", "value"))]
    part = lowered_part(g.nodes, g.inits, outputs, quantized, recipe, state["flow"], data)
    state["node_count"], state["flow"] = g.count, vars(after)
    return part, records, bits


def stream_logits(ends: EndsModel, hidden: torch.Tensor, heldout: np.ndarray):
    """A logits function over the held-out windows in order (as the task's evaluation asks for them), from the
    hidden states that reached the head."""
    cursor = [0]

    @torch.no_grad()
    def logits(inputs: dict) -> np.ndarray:
        ids = inputs["input_ids"]
        start, cursor[0] = cursor[0], cursor[0] + len(ids)
        if not np.array_equal(ids, heldout[start:cursor[0], :-1]):
            raise AssertionError("the evaluation asked for the held-out windows out of order")
        return ends(hidden[start:cursor[0]]).numpy()
    return logits


def head_without_statistics(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe for the model's ends, which are quantized before any layer (a tied table's lookups feed the
    first layer), so with no activations to calibrate on: only the quantize pass, and a head scheme that reads
    statistics (GPTQ, activation-weighted search) falls back to its data-free form; with the notes saying so."""
    passes, notes = [], []
    for name, config in recipe.passes:
        if PASSES[name].rewrites != TORCH:
            continue
        if name != "quantize":
            notes.append(f"{name} leaves the token table and the head alone in a streamed run")
            continue
        changes = {}
        if getattr(config, "method", "rtn") != "rtn":
            changes["method"] = "rtn"
        if getattr(config, "scale_search", "none") == "activation":
            changes["scale_search"] = "mse"
        if getattr(config, "activation_weighted", False):
            changes["activation_weighted"] = False
        if getattr(config, "activations", "none") != "none":
            changes["activations"] = "none"
        if changes:
            config = dataclasses.replace(config, **changes)
            notes.append(f"the head is quantized before the layers in a streamed run, without calibration data: "
                         f"{', '.join(f'{k}={v}' for k, v in changes.items())} for it")
        passes.append((name, config))
    return dataclasses.replace(recipe, passes=tuple(passes)), notes


def table_part(store: WeightStore, family: Family, recipe: Recipe, state: dict, data: ExternalData,
                heldout: np.ndarray, samples: int, task, config: dict, seed: int, log):
    """Part 0: the prologue (token lookup, mask views, rotary tables) with the token table compressed, and a tied
    head with it (it is the table); and the activations that enter layer 0 (the held-out windows as given and
    compressed, the calibration windows compressed). A tied head reads the last layer's outputs under
    placeholder names (HEAD_INPUTS), which the assembled graph renames."""
    table_recipe, notes = head_without_statistics(recipe)
    if store.tied:
        for note in notes:
            log(note)
    norm = store.tensor("model.norm.weight") if store.tied else None
    ends = EndsModel(family, store.tensor(EMBEDDING), norm, None, tied=store.tied)
    rows = torch.from_numpy(heldout[:, :-1])
    streams = {"reference": ends.decoder.model.embed_tokens.weight[rows].clone()}
    records, quantized = run_passes(ends, table_recipe, None, 1)
    table = ends.decoder.model.embed_tokens.weight
    streams["compressed"] = table[rows].clone()
    if samples:
        batches = task.calibration_data(config, samples, seed)
        streams["calibration"] = table[torch.cat([batch[0] for batch in batches])].clone()
    bits = total_model_bits(ends, quantized, float_bits=recipe.export.float_bits)
    described = ends.describe(family)
    del ends, table
    g = Graph()
    flow = prologue_nodes(g, described)
    outputs = [flow.x, flow.seqlens_k, flow.total_length] + ([flow.cos_cache, flow.sin_cache] if flow.rotary else [])
    if store.tied:
        head_nodes(g, described, Flow(HEAD_INPUTS[0], HEAD_INPUTS[1], flow.seqlens_k, flow.total_length))
        outputs.append("logits")
    del described
    state.update(node_count=g.count, flow=vars(flow))
    part = lowered_part(g.nodes, g.inits, outputs, quantized, recipe, state["flow"], data)
    return part, records, bits, streams


def checked(measured: dict) -> dict:
    for which, values in measured.items():
        if not all(math.isfinite(v) for v in values.values()):
            raise UserError("the model's held-out outputs hold NaN or Inf values (its forward pass overflows): "
                            "nothing to compress" if which == "reference" else
                            "after the passes the model's outputs hold NaN or Inf values: refused before export "
                            "(change the recipe)")
    return measured


def parity_logits(ends: EndsModel, compressed: torch.Tensor, windows: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([ends(compressed[i:i + 1]).numpy() for i in range(windows)])


def measure_tied(store: WeightStore, family: Family, recipe: Recipe, streams: dict, state: dict, task,
                  heldout: np.ndarray, parity_windows: int) -> np.ndarray:
    """A tied model's held-out metric as given and as compressed, from the windows that left the last layer (the
    table and head built again: read, and quantized as part 0 was); returns the parity logits (compressed)."""
    ends = EndsModel(family, store.tensor(EMBEDDING), store.tensor("model.norm.weight"), None, tied=True)
    measured = {"reference": measure(task, stream_logits(ends, streams.pop("reference"), heldout), heldout)}
    run_passes(ends, head_without_statistics(recipe)[0], None, 1)
    compressed = streams.pop("compressed")
    measured["compressed"] = measure(task, stream_logits(ends, compressed, heldout), heldout)
    state["measured"] = checked(measured)
    return parity_logits(ends, compressed, parity_windows)


def head_part(store: WeightStore, family: Family, recipe: Recipe, streams: dict, state: dict, data: ExternalData,
               task, heldout: np.ndarray, parity_windows: int):
    """The last part of an untied model: the final norm and the head, with every torch pass of the recipe
    (calibrated on the windows that left the last layer); the held-out metrics as given and as compressed."""
    ends = EndsModel(family, None, store.tensor("model.norm.weight"), store.tensor(HEAD))
    measured = {"reference": measure(task, stream_logits(ends, streams.pop("reference"), heldout), heldout)}
    # one window per call through the head: a window's logits over a 150k vocabulary are already 150 MB
    records, quantized = run_passes(ends, recipe, streams.pop("calibration", None), batch=1)
    compressed = streams.pop("compressed")
    measured["compressed"] = measure(task, stream_logits(ends, compressed, heldout), heldout)
    state["measured"] = checked(measured)
    parity = parity_logits(ends, compressed, parity_windows)
    del compressed
    bits = total_model_bits(ends, quantized, float_bits=recipe.export.float_bits)
    described = ends.describe(family)
    del ends
    g = Graph(state["node_count"])
    head_nodes(g, described, Flow(**state["flow"]))
    del described
    part = lowered_part(g.nodes, g.inits, ["logits"], quantized, recipe, state["flow"], data)
    return part, records, bits, parity

"""An existing fp32 ONNX model as the input of `compress run`: loaded safely, and its MatMul weights quantized
with the same quantizers and the same QDQ lowering as a torch model's Linear layers (the `onnx` input adapter).

Each MatMul whose second input is a 2-D fp32 initializer W [K, N] stands for a Linear layer with weight Wᵀ.
We wrap those weights in weight-only nn.Linear shells, run the quantize pass on them (targets / ignore match the
initializer names), write the dequantized values back (the "fake-quantized" fp32 graph, the reference the
artifact is held to) and lower that graph with exporters.qdq, which finds each shell's initializer by its name.
The input graph in ONNX Runtime is the reference; the input must carry the task metadata `compress run` writes
(compressor.family, compressor.model_config), so that its held-out data and metric are known.

Before quantization the graph is simplified by onnxsim (simplify_graph): a third-party export, e.g. from torch's
TorchScript exporter, carries Constant nodes and Shape -> Gather -> Unsqueeze -> Concat chains that it folds.
"""
import errno
import inspect
import json
import os
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper, version_converter
from torch import nn

from compressor.atomic import sha256_file
from compressor.errors import UserError
from compressor.inputs.source import Source
from compressor.kv_cache import PAST_PREFIX, has_cache
from compressor.onnx_file import EXTERNAL_DATA_ABOVE, save_onnx, tensor_bytes
from compressor.ort_runtime import create_session, logits_fn, to_ort_feeds
from compressor.tasks import TASKS
from exporters import metadata_keys
from exporters.genai_config import tokenizer_files, tokenizer_sha256
from exporters.onnx_export import OPSET
from exporters.qdq import lower_to_qdq
from passes.calibration import excerpt, first_line
from passes.model_bits import UNQUANTIZED_BITS, total_model_bits

# Passes that rewrite torch modules (shapes, factorizations, training) cannot run on a graph's weight shells.
PASSES = ("quantize", "fuse")

# The model config a graph's metadata carries is read by its task (compressor.tasks): held-out windows of
# `context` tokens, sequences of `max_length`, random benchmark tokens below `vocab_size`. Each must be an int in
# a sane range, so that a tampered value is refused here rather than allocating 10**9-token windows later.
MAX_SEQUENCE = 65_536  # context / max_length: tokens per window or sequence (the samples use 13..256)
MAX_POSITIONS = 1 << 24  # max_positions (a Hugging Face LM's position limit, an export axis bound only)
MAX_VOCAB = 1 << 24  # vocab_size (the largest vocabularies today hold about 256k tokens)
CONFIG_INTS = {"context": MAX_SEQUENCE, "max_length": MAX_SEQUENCE, "max_positions": MAX_POSITIONS,
               "vocab_size": MAX_VOCAB}
# what each family's task reads of it
TASK_CONFIG_KEYS = {"gpt": ("context", "vocab_size"), "seq2seq": ("max_length",),
                    "hf-causal-lm": ("context", "max_positions", "vocab_size", "tokenizer"),
                    "hf-encoder": ("max_length", "vocab_size", "tokenizer")}


# onnxsim on the input graph. Weights are held out of it: every float initializer, and any other over
# HOLD_OUT_BYTES, goes in as a graph input of its own type and shape, so onnxsim can neither fold a weight into a new
# initializer (Transpose(table) into a transposed copy, three projections into one) nor hold the weights (its
# serialization follows the graph's size, not the model's), and each weight comes back as it was, under the name
# the QDQ lowering places it by. What stays foldable: Constant nodes and small integer initializers (shapes, axes).
SIMPLIFY = True  # False: quantize the input graph as given
# Larger models keep their graph as given: checking the simplified graph takes a second serialized copy of the
# weights and a second ONNX Runtime session (1 GiB: half the protobuf 2 GiB limit such a copy must stay under).
SIMPLIFY_MAX_BYTES = 1 << 30
HOLD_OUT_BYTES = 1024
FOLD_LIMIT = "16MB"  # onnxsim's tensor_size_threshold: no folded constant larger than this
# optimizer passes that would move a weight away from the MatMul that reads it (Q/K/V into one concatenated
# weight; MatMul + Add into Gemm, which the QDQ lowering does not lower) or bake other values into a weight
SKIPPED_OPTIMIZERS = ("fuse_qkv", "fuse_matmul_add_bias_into_gemm", "fuse_transpose_into_gemm",
                      "fuse_bn_into_conv", "fuse_add_bias_into_conv", "fuse_pad_into_conv")
# The simplified graph is kept only if every output matches the input graph's on the task's inputs within
# max |a - b| <= SIMPLIFY_RTOL * max |a|. onnxsim's rewrite is exact op for op (equal outputs with ONNX Runtime's
# graph optimizations off, tested); with them on, ONNX Runtime fuses more of the simplified graph and sums in
# another order: 4.2e-7 relative on an opset-17 TorchScript export of gpt-xs (a few fp32 roundings), 0 at opset 21.
SIMPLIFY_RTOL = 1e-5


def _ort_reason(exc: BaseException, path) -> str:
    """ONNX Runtime's message without its "[ONNXRuntimeError] : 1 : FAIL : Load model from PATH failed:" preamble,
    which would spend the message's length on the path the message already starts with."""
    text = first_line(exc, None)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = text.replace(f"Load model from {path} failed:", "").replace(str(path), Path(path).name).strip()
    return text if len(text) <= 200 else text[:197] + "..."


def is_ort_error(exc: BaseException) -> bool:
    """ONNX Runtime's own exceptions (Fail, InvalidGraph, InvalidArgument, NotImplemented, ...) derive from
    Exception only; their module tells them apart from ours."""
    return type(exc).__module__.startswith("onnxruntime")


def read_task_metadata(metadata: dict[str, str], where) -> tuple[str, dict]:
    """(family, model config) from a graph's compressor.* metadata, checked: a family this version has a task
    for, a JSON object for the config, and the config values its task reads of the right type and range."""
    family = metadata.get(metadata_keys.FAMILY)
    if family is None or metadata_keys.MODEL_CONFIG not in metadata:
        raise UserError(f"{where} carries no compressor task metadata (compressor.family, compressor.model_config): "
                        f"export the model with `compress run CHECKPOINT` (recipe fp32) to get one")
    if family not in TASKS:
        raise UserError(f"{where}: compressor.family {excerpt(family)} is not a model family this version knows "
                        f"({', '.join(TASKS)})")
    try:
        config = json.loads(metadata[metadata_keys.MODEL_CONFIG])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; an integer of over 4300 digits; deep nesting
        raise UserError(f"{where}: compressor.model_config is not valid JSON ({first_line(exc, 100)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: compressor.model_config must be a JSON object, not {excerpt(config)}")
    for key in TASK_CONFIG_KEYS.get(family, ()):
        if key not in config:
            raise UserError(f"{where}: compressor.model_config lacks {key!r}, which the {family} task reads")
    for key, high in CONFIG_INTS.items():
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise UserError(f"{where}: compressor.model_config {key} must be an integer in 1..{high:,}, not "
                            f"{excerpt(value)}")
    if "context" in config and "max_positions" in config and config["context"] > config["max_positions"]:
        raise UserError(f"{where}: compressor.model_config context {config['context']} exceeds max_positions "
                        f"{config['max_positions']}")
    if "tokenizer" in TASK_CONFIG_KEYS.get(family, ()):
        config["tokenizer"] = _tokenizer_folder(config, where)
    return family, config


def _tokenizer_folder(config: dict, where) -> str:
    """Where the model's tokenizer is: beside the model file (where `compress run` copies its files; the metadata
    names the folder they came from and their sha256, which they must match), else the absolute folder an artifact
    of an earlier version recorded."""
    recorded, digest = config["tokenizer"], config.get("tokenizer_sha256")
    beside = Path(where).parent
    files = tokenizer_files(beside)
    if any(name in files for name in ("tokenizer.json", "tokenizer_config.json")):
        if isinstance(digest, str) and tokenizer_sha256(files) != digest:
            raise UserError(f"{where}: the tokenizer files beside it are not those it was made with (their sha256 "
                            f"is not its compressor.model_config tokenizer_sha256)")
        return str(beside.resolve())
    if isinstance(recorded, str) and "\0" not in recorded and os.path.isabs(recorded) and Path(recorded).is_dir():
        return recorded
    raise UserError(f"{where}: no tokenizer files beside it (tokenizer.json, tokenizer_config.json), and "
                    f"compressor.model_config tokenizer must name the folder of the model's tokenizer, not "
                    f"{excerpt(recorded)} (no such folder here)")


def check_graph_inputs(session, task, where) -> None:
    """The graph takes the inputs its family's task feeds (a gpt graph labelled seq2seq would fail mid-run), plus,
    for a decoder with a KV cache, the mask and pasts that compressor.kv_cache fills in for a full-sequence call."""
    names = [i.name for i in session.get_inputs()]
    if has_cache(session):
        names = [n for n in names if n != "attention_mask" and not n.startswith(PAST_PREFIX)]
    if sorted(names) != sorted(task.INPUT_NAMES):
        raise UserError(f"{where}: the graph's inputs ({excerpt(names, 100)}) are not those of its family's task "
                        f"({', '.join(task.INPUT_NAMES)})")


def ort_session(path, where):
    """create_session, with ONNX Runtime's refusals (an op of a domain it has no kernel for, a graph it cannot
    partition) as one-line user errors."""
    try:
        return create_session(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (only ONNX Runtime's own errors become user errors)
        if not is_ort_error(exc):
            raise
        raise UserError(f"{where}: ONNX Runtime cannot load the model ({_ort_reason(exc, path)})") from None


def guarded_logits_fn(session, where):
    """logits_fn(session) whose ONNX Runtime failures (e.g. positions past the graph's tables, when the metadata's
    context is larger than the model's) are one-line user errors, and not also logged by ONNX Runtime itself (its
    error log would add lines to the one-line message on stderr)."""
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # fatal only: the failure comes back as the exception

    def guarded(inputs):
        try:
            return session.run(None, to_ort_feeds(inputs, session), quiet)[0]
        except Exception as exc:  # noqa: BLE001
            if not is_ort_error(exc):
                raise
            raise UserError(f"{where}: ONNX Runtime failed to run the model on its task's inputs "
                            f"({_ort_reason(exc, where)}): does compressor.model_config match the graph?") from None
    return guarded


def is_onnx_input(path: Path) -> bool:
    return Path(path).suffix == ".onnx"


def check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """External tensor files must lie inside the model's own folder: no absolute paths, no `..` escapes."""
    root = folder.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        where = f"tensor {excerpt(tensor.name)}: external data location {excerpt(location)}"
        if "\0" in location:  # no file name holds one; the OS would refuse it, Python raises ValueError
            raise UserError(f"{where} holds a NUL byte: refused")
        try:
            target = (root / location).resolve()
        except RuntimeError:  # pathlib's "Symlink loop from ..."
            raise UserError(f"{where} is a loop of symbolic links: refused") from None
        if not location or os.path.isabs(location) or (root not in target.parents):
            raise UserError(f"tensor {excerpt(tensor.name)} points to external data {excerpt(location)} outside the "
                            f"model's folder {folder}: refused")
        try:
            info = os.stat(target)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{where} is a loop of symbolic links: refused") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise UserError(f"tensor {excerpt(tensor.name)}: external data file {excerpt(location)} is "
                                f"missing") from None
            raise UserError(f"{where} cannot be read ({exc.strerror or exc})") from None
        if not stat.S_ISREG(info.st_mode):  # a folder; a FIFO, which a read would wait on forever
            raise UserError(f"{where} is not a file")


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t


def load_onnx_input(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's errors are long; the first line names the problem
        raise UserError(f"{path} is not a readable ONNX model ({first_line(exc, 120)})") from None
    check_external_data(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise UserError(f"{path} is not a valid ONNX model ({first_line(exc)})") from None
    for tensor in proto.graph.initializer:  # -inf is legitimate in attention-mask constants; NaN never is
        if tensor.data_type == TensorProto.FLOAT and np.isnan(numpy_helper.to_array(tensor)).any():
            raise UserError(f"{path}: initializer {excerpt(tensor.name)} contains NaN values")
    for name, weight in matmul_weights(proto).items():
        if not np.isfinite(weight).all():
            raise UserError(f"{path}: MatMul weight {excerpt(name)} contains Inf values")
    return proto


def matmul_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{initializer name: W [K, N]} for every MatMul whose weight is a 2-D fp32 initializer."""
    initializers = {t.name: t for t in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            if tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2:
                weights[tensor.name] = numpy_helper.to_array(tensor)
    return weights


class WeightShells(nn.Module):
    """Weight-only nn.Linear shells named after the ONNX initializers they stand for."""

    def __init__(self, weights: dict[str, np.ndarray]):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.onnx_names = {}
        for index, (name, weight) in enumerate(weights.items()):
            k, n = weight.shape
            shell = nn.Linear(k, n, bias=False)
            shell.weight.data = torch.from_numpy(np.ascontiguousarray(weight.T)).float()
            key = f"w{index}"
            self.layers[key] = shell
            self.onnx_names[key] = name

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """Report shells under their ONNX initializer names, so recipe targets / ignore can name them."""
        yield prefix, self
        for key, shell in self.layers.items():
            yield self.onnx_names[key], shell


def write_back(proto: onnx.ModelProto, shells: WeightShells) -> onnx.ModelProto:
    """A copy of `proto` whose MatMul weights hold the shells' (now dequantized) values."""
    fake = onnx.ModelProto()
    fake.CopyFrom(proto)
    values = {shells.onnx_names[k]: s.weight.detach().numpy().T for k, s in shells.layers.items()}
    for tensor in fake.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[tensor.name]), tensor.name))
    return fake


def graph_bits(proto: onnx.ModelProto, shells: WeightShells, quantized: dict,
               float_bits: int = UNQUANTIZED_BITS) -> dict:
    """Total model bits of the graph: the shells' k-bit weights plus every other float initializer at `float_bits`
    (always 32: an ONNX input is written back at its own float32)."""
    shell_bits = total_model_bits(shells, quantized, float_bits)
    in_shells = set(shells.onnx_names.values())
    other = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                if t.name not in in_shells and t.data_type == onnx.TensorProto.FLOAT)
    params = shell_bits["params"] + other
    total = shell_bits["total_model_bits"] + other * float_bits
    return {"total_model_bits": total, "bits_per_param": total / params, "params": params,
            "quantized_params": shell_bits["quantized_params"], "unquantized_bits_per_param": float_bits}


def simplify_graph(proto: onnx.ModelProto, reference, inputs: dict) -> tuple[onnx.ModelProto, dict]:
    """(the graph to quantize, what simplification did): `proto` simplified by onnxsim when that removes nodes,
    keeps every weight read where it was read and matches `reference` (the input graph's session) on `inputs`;
    else `proto` itself and the reason it was kept."""
    before = len(proto.graph.node)

    def kept(reason: str) -> tuple[onnx.ModelProto, dict]:
        return proto, {"applied": False, "nodes_before": before, "nodes_after": before, "reason": reason}

    if not SIMPLIFY:
        return kept("off (compressor.inputs.onnx.SIMPLIFY)")
    size = proto.ByteSize()
    if size > SIMPLIFY_MAX_BYTES:
        return kept(f"the model is {size / 2**20:,.1f} MiB, over the {SIMPLIFY_MAX_BYTES / 2**20:,.1f} MiB this "
                    f"step takes")
    light, held = _weights_as_inputs(proto)
    try:
        import onnxsim

        # no Z3 proof attempt (onnxsim >= 0.8 tries one when z3-solver is installed): time and memory stay bounded
        certify = {"certify": False} if "certify" in inspect.signature(onnxsim.simplify).parameters else {}
        simplified, _ = onnxsim.simplify(light, skipped_optimizers=list(SKIPPED_OPTIMIZERS),
                                         tensor_size_threshold=FOLD_LIMIT, **certify)
        onnx.checker.check_model(simplified)
    except Exception as exc:  # noqa: BLE001  (any failure keeps the input graph, and says why in the report)
        return kept(f"onnxsim failed: {first_line(exc)}")
    if len(simplified.graph.node) >= before:
        return kept(f"onnxsim removed no node ({len(simplified.graph.node)} after)")
    result = _weights_restored(proto, simplified, held)
    moved = _weight_reads(proto, held) ^ _weight_reads(result, held)
    if moved:
        name, op, position = sorted(moved)[0]
        return kept(f"onnxsim changed how weights are read ({len(moved)} reads, e.g. {excerpt(name)} as input "
                    f"{position} of {op})")
    differs = _output_difference(result, reference, inputs)
    if differs:
        return kept(differs)
    ops_before = Counter(node.op_type for node in proto.graph.node)
    ops_after = Counter(node.op_type for node in result.graph.node)
    changes = {op: ops_after[op] - ops_before[op] for op in sorted(ops_before | ops_after)
               if ops_after[op] != ops_before[op]}
    return result, {"applied": True, "nodes_before": before, "nodes_after": len(result.graph.node),
                    "op_changes": changes, "onnxsim": onnxsim.__version__}


def _weights_as_inputs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of `proto` without its weights' data (each a graph input of its type and shape instead), and their
    names. Other initializers, nodes and model fields are copied; the weights are not."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    light = _model_fields(proto)
    graph = light.graph
    for field, value in proto.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    inputs = {i.name for i in graph.input}
    held = set()
    for tensor in proto.graph.initializer:
        if tensor.data_type in floats or tensor.ByteSize() > HOLD_OUT_BYTES:
            held.add(tensor.name)
            if tensor.name not in inputs:  # IR < 4 lists initializers among the inputs already
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                      list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    return light, held


def _weights_restored(proto: onnx.ModelProto, simplified: onnx.ModelProto, held: set[str]) -> onnx.ModelProto:
    """`simplified`'s nodes with `proto`'s weights, inputs, outputs, shape hints and model fields: the initializers
    in `proto`'s order (those still read), then the constants onnxsim folded."""
    result = _model_fields(proto)
    graph = result.graph
    graph.CopyFrom(simplified.graph)
    for name in ("input", "output", "value_info", "initializer"):
        graph.ClearField(name)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    read = _names_read(graph) | {o.name for o in graph.output}
    graph.value_info.extend(v for v in proto.graph.value_info if v.name in read)
    folded = {t.name: t for t in simplified.graph.initializer}
    for tensor in proto.graph.initializer:
        if tensor.name in held:
            if tensor.name in read:
                graph.initializer.append(tensor)
        elif tensor.name in folded:
            graph.initializer.append(folded.pop(tensor.name))
    graph.initializer.extend(folded.values())
    for name in ("name", "doc_string"):  # onnxsim drops doc strings
        setattr(graph, name, getattr(proto.graph, name))
    return result


def _model_fields(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto with `proto`'s fields other than its graph (opset, IR version, metadata, functions)."""
    model = onnx.ModelProto()
    for field, value in proto.ListFields():
        if field.name != "graph":
            _copy_field(model, field, value)
    return model


def _copy_field(message, field, value) -> None:
    target = getattr(message, field.name)
    if isinstance(value, (int, float, str, bytes)):
        setattr(message, field.name, value)
    elif hasattr(target, "extend"):  # a repeated field
        target.extend(value)
    else:
        target.CopyFrom(value)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of `graph` reads, those read from inside its subgraphs (If, Loop, Scan) included."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                names |= _names_read(subgraph)
    return names


def _weight_reads(proto: onnx.ModelProto, names: set[str]) -> set[tuple[str, str, int]]:
    """(weight, op, input position) for each read of a weight by a node, through Identity nodes (which
    TorchScript exports put between a tensor and its second user, and onnxsim removes) and through a Transpose (a
    tied table): simplification must leave each weight read by the same kinds of node in the same places."""
    alias = {}  # value -> (the weight it is, whether transposed)
    reads = set()
    for node in proto.graph.node:
        sources = [alias.get(name, (name, False)) if name in names or name in alias else None for name in node.input]
        if node.op_type == "Identity" and sources and sources[0]:
            alias[node.output[0]] = sources[0]
        elif node.op_type == "Transpose" and sources and sources[0] and not sources[0][1]:
            alias[node.output[0]] = (sources[0][0], True)
        else:
            reads |= {(source[0], f"Transpose -> {node.op_type}" if source[1] else node.op_type, position)
                      for position, source in enumerate(sources) if source}
    return reads


def _output_difference(proto: onnx.ModelProto, reference, inputs: dict,
                       what: str = "the simplified graph") -> str | None:
    """Why `proto`'s outputs do not match the reference session's on `inputs` (SIMPLIFY_RTOL), or None."""
    try:
        session = session_of(proto)
        got = session.run(None, to_ort_feeds(inputs, session))
        expected = reference.run(None, to_ort_feeds(inputs, reference))
    except Exception as exc:  # noqa: BLE001  (a graph ONNX Runtime cannot run is no simplification of ours)
        return f"{what} failed to run ({first_line(exc)})"
    names = [o.name for o in reference.get_outputs()]
    for name, a, b in zip(names, expected, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"{what}'s {name} has shape {list(b.shape)}, not {list(a.shape)}"
        if a.size:
            worst = float(np.abs(a.astype(np.float64) - b).max())
            scale = float(np.abs(a).max())
            if not worst <= SIMPLIFY_RTOL * scale:  # NaN fails too
                return (f"{what}'s {name} differs from the input graph's by {worst:.3g} "
                        f"(max |{name}| {scale:.3g}; allowed {SIMPLIFY_RTOL:g} of it)")
    return None


def at_artifact_opset(proto: onnx.ModelProto, reference, inputs: dict, where) -> tuple[onnx.ModelProto, dict | None]:
    """The graph at the artifact's opset (exporters.onnx_export.OPSET: the k-bit lowering writes DequantizeLinear
    with block_size, which older opsets lack): an older graph goes through ONNX's version converter and must then
    compute what it did (SIMPLIFY_RTOL: measured 2e-7 relative on an opset-17 TorchScript export of gpt-xs).
    Returns the graph and {from, to} when converted. UserError when it cannot be."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    if version >= OPSET:
        return proto, None
    fix = f"re-export the model at opset {OPSET}"
    try:
        converted = version_converter.convert_version(proto, OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001  (the converter's failures have no common type)
        raise UserError(f"{where} is at opset {version} and ONNX's version converter cannot bring it to opset "
                        f"{OPSET}, which k-bit weights need ({first_line(exc, 100)}): {fix}") from None
    problem = _output_difference(converted, reference, inputs, what=f"the graph converted to opset {OPSET}")
    if problem is not None:
        raise UserError(f"{where} is at opset {version}: {problem}: {fix}")
    return converted, {"from": version, "to": OPSET}


def describe_simplification(record: dict) -> str:
    """The one log line for simplify_graph's record."""
    if not record["applied"]:
        return f"onnxsim: input graph kept as given, {record['nodes_before']} nodes ({record['reason']})"
    changes = ", ".join(f"{op} {change:+d}" for op, change in
                        sorted(record["op_changes"].items(), key=lambda item: (item[1], item[0])))
    return f"onnxsim: {record['nodes_before']} -> {record['nodes_after']} nodes ({changes})"


def session_of(proto: onnx.ModelProto):
    """An ONNX Runtime session over a graph in memory: from its bytes, or past EXTERNAL_DATA_ABOVE (protobuf
    serializes no message over 2 GiB) from a temporary model.onnx + model.onnx.data."""
    if tensor_bytes(proto) <= EXTERNAL_DATA_ABOVE:
        return create_session(proto.SerializeToString())
    import tempfile

    with tempfile.TemporaryDirectory(prefix="compress-session-") as folder:
        path = Path(folder) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)  # save_model moves the tensors out of the proto it is given
        save_onnx(copy, path)
        del copy
        return create_session(path)


def onnx_source(path: Path, progress: bool = False) -> Source:
    proto = load_onnx_input(path)
    metadata = {p.key: p.value for p in proto.metadata_props}
    family, config = read_task_metadata(metadata, path)
    weights = matmul_weights(proto)
    if not weights:
        raise UserError(f"{path} has no MatMul with a 2-D fp32 weight: nothing to compress (already quantized?)")
    reference = ort_session(path, path)  # before any work: a graph ONNX Runtime cannot run is no input
    check_graph_inputs(reference, TASKS[family], path)
    reference_fn = guarded_logits_fn(reference, path)
    # one batch-1 run at the task's working shape (e.g. `context` tokens below `vocab_size`): a config that does
    # not fit the graph (a context past its position table) fails here, before --out is touched
    check_inputs = TASKS[family].benchmark_inputs(config, 1)
    if not np.isfinite(reference_fn(check_inputs)).all():  # finite weights can overflow; nothing to hold an artifact to
        raise UserError(f"{path}: the model's outputs hold NaN or Inf values (its forward pass overflows): nothing "
                        f"to compress")
    proto, converted = at_artifact_opset(proto, reference, check_inputs, path)
    # `weights` stay those of the input graph: simplify_graph keeps their names, values and readers
    proto, simplified = simplify_graph(proto, reference, check_inputs)
    shells = WeightShells(weights)
    digest = sha256_file(path)
    record = {"name": Path(path).stem, "family": family, "source": str(path), "source_sha256": digest,
              "config": config, "input_format": "onnx", "simplified": simplified,
              **({"opset_converted": converted} if converted else {})}

    def fake_quantized_fn(model, quantized):  # the shells' current values, written back into the graph
        graph = write_back(proto, model)
        if any(layer.activation is not None for layer in quantized.values()):  # dynamic W8A8 (static calibrates)
            graph, _ = lower_to_qdq(graph, quantized)  # its activation Q/DQ is what the graph-side model computes
        return logits_fn(session_of(graph))

    return Source(name=record["name"], task=TASKS[family], config=config, model=shells, record=record,
                  # the file by its folder's name, not where the folder lies: the artifact's bytes do not change with it
                  metadata={**metadata, metadata_keys.SOURCE: f"{Path(path).resolve().parent.name}/{Path(path).name}",
                            metadata_keys.SOURCE_SHA256: digest},
                  logits_fn=fake_quantized_fn, export=lambda model, inputs, progress: write_back(proto, model),
                  bits=lambda model, quantized, float_bits=UNQUANTIZED_BITS: graph_bits(proto, model, quantized,
                                                                                      float_bits),
                  reference_fn=reference_fn, notes=(
                      (f"opset {converted['from']} -> {converted['to']} (ONNX's version converter)",) if converted
                      else ()) + (describe_simplification(simplified),))

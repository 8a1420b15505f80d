"""Lower a torch model to a checked ONNX graph that stock ONNX Runtime (CPU and CUDA 1.31) loads.

Choices (see ../shared/notes/ort-facts.md): the dynamo exporter at opset 21 (QuantizeLinear/DequantizeLinear
with block_size need 21; 26 exports silently broken files) with its onnxscript optimizer (constant folding),
IR version 10 (onnxruntime-gpu 1.31 rejects newer), weights in the proto (compressor.onnx_file decides how the
artifact stores them on disk: one file, or model.onnx.data beside it past 1 GiB of tensors), onnx.checker.
Each nn.Linear's MatMul weight becomes an initializer named `<module>.weight` (the exporter calls its transposed
copy `val_N`), so the QDQ lowering finds a layer's initializer by name; a tied weight (an LM head sharing the
embedding table) stays Transpose(table), stored once. Exporters hand protos up; the caller writes files.

No onnxsim pass: on every graph we export (GPT and seq2seq samples, Llama, BERT, GPT-2) it changed nothing
but folding that tied-weight Transpose into a second copy of the table (113 MB more file on SmolLM2-135M), and
its serialization round trips took 3.4 GB of RSS there (0.54 GB of weights).
"""
import ast
import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from exporters import metadata_keys
from exporters.cache_in_place import IN_PLACE, writes_cache_in_place
from passes.calibration import first_line

OPSET = 21
IR_VERSION = 10


class ExportError(RuntimeError):
    """torch.onnx.export failed; the message is the first line of its own error."""


def export_onnx(model: nn.Module, example_inputs: dict[str, np.ndarray], dynamic_axes: dict, output_name: str,
                progress: bool = False) -> onnx.ModelProto:
    """Export `model` called as model(*example_inputs.values()); dynamic_axes = {input: {axis: (name, max)}}.
    Returns the fp32 graph; finalize() completes it. With `progress`, a bar on stderr while torch.onnx.export runs."""
    model = model.eval()
    args = tuple(torch.from_numpy(v) for v in example_inputs.values())
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for input_name, axes in dynamic_axes.items():
        dynamic_shapes[input_name] = {}
        for axis, (dim_name, upper) in axes.items():
            dims.setdefault(dim_name, torch.export.Dim(dim_name, min=1, max=upper))
            dynamic_shapes[input_name][axis] = dims[dim_name]
    with tqdm(total=1, desc="ONNX export", unit="step", disable=not progress, leave=False) as stages:
        stages.set_postfix_str("torch.onnx.export")
        try:
            with _quiet():
                program = torch.onnx.export(
                    model, args, dynamo=True, opset_version=OPSET, input_names=list(example_inputs),
                    output_names=[output_name], dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                    optimize=True,
                )
        except Exception as exc:  # the exporter's own errors are long; keep the first line
            raise ExportError(f"ONNX export failed: {first_line(exc, 200)}") from None
        proto = program.model_proto
        name_linear_weights(proto)
        for node in proto.graph.node:  # source paths and stack traces: bytes that differ by checkout, not model
            del node.metadata_props[:]
            node.doc_string = ""
        stages.update()
    proto.ir_version = IR_VERSION
    return proto


def finalize(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Describe the artifact (source, tool version, recipe) in metadata_props, and say so where its KV cache can
    stay in one buffer (exporters.cache_in_place); compressor.artifact.save_onnx runs the full
    checker on the file it writes."""
    del proto.metadata_props[:]
    if writes_cache_in_place(proto.graph):
        metadata = {**metadata, metadata_keys.KV_CACHE: IN_PLACE}
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=str(value))
    return proto


def name_linear_weights(proto: onnx.ModelProto) -> int:
    """Rename each MatMul weight initializer that an nn.Linear exported (the dynamo exporter's node metadata
    names the module: pkg.torch.onnx.name_scopes ends in [..., module, op]) to `<module>.weight`, unless that
    name is taken. A tied weight is read as Transpose(table) and keeps the table's name (the QDQ lowering looks
    through the Transpose). Returns how many were renamed."""
    taken = {init.name for init in proto.graph.initializer} | {i.name for i in proto.graph.input}
    initializers = {init.name: init for init in proto.graph.initializer}
    renames = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type != "MatMul" or node.input[1] not in initializers or "aten.linear" not in meta.get(
                "pkg.torch.onnx.fx_node", "") or node.input[1] in renames:
            continue
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        if len(scopes) >= 2 and scopes[-2] and f"{scopes[-2]}.weight" not in taken:
            renames[node.input[1]] = f"{scopes[-2]}.weight"
            taken.add(renames[node.input[1]])
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    return len(renames)


@contextlib.contextmanager
def _quiet():
    """The exporter talks a lot on stdout/logging; the CLI shows its own progress instead."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

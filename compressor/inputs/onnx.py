"""An existing fp32 ONNX model as the input of `compress run`: loaded safely, and its MatMul weights quantized
with the same quantizers and the same QDQ lowering as a torch model's Linear layers (the `onnx` input adapter).

Each MatMul whose second input is a 2-D fp32 initializer W [K, N] stands for a Linear layer with weight Wᵀ.
We wrap those weights in weight-only nn.Linear shells, run the quantize pass on them (targets / ignore match the
initializer names), write the dequantized values back (the "fake-quantized" fp32 graph, the reference the
artifact is held to) and lower that graph with exporters.qdq, which finds each shell's initializer by its name.
The input graph in ONNX Runtime is the reference; the input must carry the task metadata `compress run` writes
(compressor.family, compressor.model_config), so that its held-out data and metric are known.
"""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from compressor.atomic import sha256_file
from compressor.errors import UserError
from compressor.inputs.source import Source
from compressor.ort_runtime import create_session, logits_fn
from compressor.tasks import TASKS
from passes.model_bits import UNQUANTIZED_BITS, total_model_bits

# Passes that rewrite torch modules (shapes, factorizations, training) cannot run on a graph's weight shells.
PASSES = ("quantize", "fuse")


def is_onnx_input(path: Path) -> bool:
    return Path(path).suffix == ".onnx"


def _check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """External tensor files must lie inside the model's own folder: no absolute paths, no `..` escapes."""
    root = folder.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if not location or os.path.isabs(location) or (root not in target.parents):
            raise UserError(f"tensor {tensor.name!r} points to external data {location!r} outside the model's "
                            f"folder {folder}: refused")
        if not target.is_file():
            raise UserError(f"tensor {tensor.name!r}: external data file {location!r} is missing")


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
        raise UserError(f"{path} is not a readable ONNX model ({str(exc).strip().splitlines()[0][:120]})") from None
    _check_external_data(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise UserError(f"{path} is not a valid ONNX model ({str(exc).strip().splitlines()[0][:160]})") from None
    for tensor in proto.graph.initializer:  # -inf is legitimate in attention-mask constants; NaN never is
        if tensor.data_type == TensorProto.FLOAT and np.isnan(numpy_helper.to_array(tensor)).any():
            raise UserError(f"{path}: initializer {tensor.name} contains NaN values")
    for name, weight in matmul_weights(proto).items():
        if not np.isfinite(weight).all():
            raise UserError(f"{path}: MatMul weight {name} contains Inf values")
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


def graph_bits(proto: onnx.ModelProto, shells: WeightShells, quantized: dict) -> dict:
    """Total model bits of the graph: the shells' k-bit weights plus every other float initializer at 32 bits."""
    shell_bits = total_model_bits(shells, quantized)
    in_shells = set(shells.onnx_names.values())
    other = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                if t.name not in in_shells and t.data_type == onnx.TensorProto.FLOAT)
    params = shell_bits["params"] + other
    total = shell_bits["total_model_bits"] + other * UNQUANTIZED_BITS
    return {"total_model_bits": total, "bits_per_param": total / params, "params": params,
            "quantized_params": shell_bits["quantized_params"], "unquantized_bits_per_param": UNQUANTIZED_BITS}


def onnx_source(path: Path, progress: bool = False) -> Source:
    proto = load_onnx_input(path)
    metadata = {p.key: p.value for p in proto.metadata_props}
    if metadata.get("compressor.family") not in TASKS or "compressor.model_config" not in metadata:
        raise UserError(f"{path} carries no compressor task metadata (compressor.family, compressor.model_config): "
                        f"export the model with `compress run CHECKPOINT` (recipe fp32) to get one")
    family, config = metadata["compressor.family"], json.loads(metadata["compressor.model_config"])
    weights = matmul_weights(proto)
    if not weights:
        raise UserError(f"{path} has no MatMul with a 2-D fp32 weight: nothing to compress (already quantized?)")
    shells = WeightShells(weights)
    digest = sha256_file(path)
    record = {"name": Path(path).stem, "family": family, "source": str(path), "source_sha256": digest,
              "config": config, "input_format": "onnx"}

    def fake_quantized_fn(model, quantized):  # the shells' current values, written back into the graph
        return logits_fn(create_session(write_back(proto, model).SerializeToString()))

    return Source(name=record["name"], task=TASKS[family], config=config, model=shells, record=record,
                  metadata={**metadata, "compressor.source": str(path), "compressor.source_sha256": digest},
                  logits_fn=fake_quantized_fn, export=lambda model, inputs, progress: write_back(proto, model),
                  bits=lambda model, quantized: graph_bits(proto, model, quantized),
                  reference_fn=logits_fn(create_session(path)))

"""The one place that knows the order in which an exported fp32 graph becomes the artifact's graph: the quantize
records placed as k-bit storage (exporters.qdq), the recipe's graph passes, parallel MatMuls packed
(exporters.pack), W8A8 MatMuls written as integer kernels (exporters.integer_matmul), and the float16 variant
(exporters.float16). The pipeline calls lower_artifact and baseline_artifact and nothing below them."""
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from exporters.float16 import to_float16
from exporters.integer_matmul import fuse_integer_matmuls
from exporters.pack import pack_parallel_matmuls
from exporters.qdq import lower_to_qdq

FLOAT16 = "float16"


@dataclass(frozen=True)
class Lowered:
    """What the artifact's graph holds, as validation needs to know it (its tolerances) and the report shows it."""
    record: dict | None  # exporters.qdq's record (+ the integer kernels' counts); None for an fp32 artifact
    int_weights: bool  # k-bit weights that ONNX Runtime may run in an approximate (faster) mode
    integer_activations: bool  # W8A8: integer GEMMs
    float16: bool


def lower_artifact(proto: onnx.ModelProto, quantized: dict | None, dtype: str,
                   graph_passes: Callable[[onnx.ModelProto], onnx.ModelProto]) -> tuple[onnx.ModelProto, Lowered]:
    """`quantized`: the quantize pass's records ({} when the recipe quantizes nothing), or None for an fp32
    artifact, which keeps one weight per module (it is also an input, an ONNX one, for later runs): no packing.
    `graph_passes` runs the recipe's ONNX -> ONNX passes on the lowered graph, before packing. LoweringError
    (a ValueError) names a record the graph has no place for."""
    record = None
    if quantized is not None:
        proto, record = lower_to_qdq(proto, quantized)
    activations = any(layer.activation is not None for layer in (quantized or {}).values())
    proto = graph_passes(proto)
    if quantized is not None:
        float_zero_points = any(entry.get("float_zero_points") for entry in record["lowered"])
        _pack(proto, float_zero_points=float_zero_points, activations=activations)
    if activations:  # after packing: the integer kernels themselves, bias Adds inside
        record["activations"].update(fuse_integer_matmuls(proto))
    if dtype == FLOAT16:
        proto = to_float16(proto)
    return proto, Lowered(record, bool(record and record["lowered"]), activations, dtype == FLOAT16)


def baseline_artifact(proto: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """The input model's graph as the artifact's would be without quantization (packed, at the artifact's float
    type): the speed-ups' denominator measures quantization, not packing."""
    _pack(proto)
    return to_float16(proto) if dtype == FLOAT16 else proto


def _pack(proto: onnx.ModelProto, float_zero_points: bool = False, activations: bool = False) -> None:
    """Decoders with a KV cache decode one token per call, where each MatMul call costs a thread-pool round trip:
    their q/k/v (and gate/up) MatMuls are packed into one each (exporters.pack; values unchanged). Float zero
    points pack in any graph: their block sums then run inside the main weights' MatMulNBits (left alone, ORT's
    ConstantSharing merges the tiny equal E scales of models with K <= 2B and the block sums stay unfused).
    W8A8 graphs pack too: siblings already share one quantization of their input, so one integer GEMM serves them."""
    if float_zero_points or activations or any(i.name.startswith("past_key_values.") for i in proto.graph.input):
        pack_parallel_matmuls(proto)

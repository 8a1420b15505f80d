"""The float16 variant of an exported (and QDQ-lowered) graph, for the CUDA execution provider, whose
MatMulNBits and GroupQueryAttention kernels are float16 (GroupQueryAttention has no float32 CUDA kernel).

ONNX Runtime's own converter (onnxruntime.transformers.float16) does the rewrite: float initializers,
inputs/outputs (logits, past/present caches) and DequantizeLinear scales become float16, so each k-bit weight
still dequantizes straight into its MatMul and ONNX Runtime fuses the pair into MatMulNBits. Integer codes, zero
points and the int64 graph inputs are untouched; total model bits change only by the fp32 tensors halved.
"""
import onnx


def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=True)
    converted.ir_version = proto.ir_version
    return converted

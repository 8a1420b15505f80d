"""Total model bits, counted exactly (the x-axis of the k-bit scaling laws; see kbit-reference.md):
per quantized tensor n*k + every scale, zero point and codebook entry at the width the artifact stores it,
plus every other parameter at its stored width (fp32 in our artifacts)."""
from dataclasses import dataclass

import torch

from passes.quant_primitives import Quantized

UNQUANTIZED_BITS = 32
CODEBOOK_ENTRY_BITS = 32  # codebooks are fp32 initializers in the artifact


def container_bits(bits: int) -> int:
    """Width of the integer type that carries k-bit codes in ONNX: int2 (opset 25), int4, or int8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass(frozen=True)
class TensorBits:
    codes: int
    scales: int
    zero_points: int  # integer zero points, plus a float zero point's rest at the scale width
    codebook: int

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zero_points + self.codebook


def quantized_tensor_bits(q: Quantized, float_bits: int = UNQUANTIZED_BITS) -> TensorBits:
    """`float_bits`: the artifact's float width (16 for a float16 export, which stores fp32 scales as fp16)."""
    scale_bits = min(torch.finfo(q.scales.dtype).bits, float_bits)
    return TensorBits(
        codes=q.codes.numel() * q.bits,
        scales=q.scales.numel() * scale_bits,
        zero_points=(0 if q.zero_points is None else q.zero_points.numel() * container_bits(q.bits))
        + (0 if q.offsets is None else q.offsets.numel() * scale_bits),
        codebook=0 if q.codebook is None else q.codebook.numel() * min(CODEBOOK_ENTRY_BITS, float_bits),
    )


def total_model_bits(model: torch.nn.Module, quantized: dict | None = None,
                     float_bits: int = UNQUANTIZED_BITS) -> dict:
    """`quantized`: the quantize pass's records {module name: QuantizedLayer}; those modules' weights count at
    their k-bit storage, every other parameter at `float_bits` (32, or 16 for a float16 export)."""
    quantized_bits = quantized_params = 0
    quantized_ids = set()
    modules = dict(model.named_modules())
    for name, layer in (quantized or {}).items():
        weight = modules[name].weight
        quantized_bits += quantized_tensor_bits(layer.quantized, float_bits).total
        quantized_params += weight.numel()
        quantized_ids.add(id(weight))
    params = sum(p.numel() for p in model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    total = quantized_bits + other * float_bits
    return {"total_model_bits": total, "bits_per_param": total / params, "params": params,
            "quantized_params": quantized_params, "unquantized_bits_per_param": float_bits}

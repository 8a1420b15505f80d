"""What the quantize pass hands the exporter per layer: the codes and what dequantizes them, the scheme that made
them (which also writes their ONNX form) and how the layer's input is quantized."""
from dataclasses import dataclass

from passes import quant_primitives as qp
from passes.quantize.activations import ActivationQuant


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized nn.Linear (or nn.Embedding table, `embedding`): the codes, scales, zero points / codebook
    (`quantized`, for the weight [out, in], a table [rows, dim]), every name its weight parameter goes by (a tied
    embedding shares it), the scheme that quantized it (`scheme.lower` writes its ONNX form) and how its input is
    quantized (`activation`, or None)."""
    module: str
    weight_names: tuple[str, ...]
    quantized: qp.Quantized
    scheme: object  # IntWeights, CodebookWeights or EmbeddingTables
    activation: ActivationQuant | None = None
    embedding: bool = False
    tied_table: str = "copy"

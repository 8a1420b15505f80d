"""k-bit quantization, one home per scheme: int_weights (uniform levels; GPTQ as its solver), codebook (log2,
float, NormalFloat, quantile, k-means), activations (W8A8: integer activations, SmoothQuant, observers) and
embeddings (k-bit tables). Each holds its frozen config, its per-layer quantizer and its ONNX lowering;
quantize_pass runs them over a model and config.QuantizeConfig is the recipe's `quantize:` section."""
from passes.quantize.config import QuantizeConfig
from passes.quantize.quantize_pass import quantizable, quantize_model, quantize_weight
from passes.quantize.record import QuantizedLayer

__all__ = ["QuantizeConfig", "QuantizedLayer", "quantizable", "quantize_model", "quantize_weight"]

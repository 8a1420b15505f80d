"""Graph fusion (ONNX -> ONNX, the last stage): onnxscript's rewrite rules for ONNX Runtime's fused kernels.

Layer fusions (default): LayerNorm + residual Add -> SkipLayerNormalization, RMSNorm (+ residual) ->
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, erf-GELU (+ bias) -> Gelu / BiasGelu. They
leave every MatMul and its DequantizeLinear weight alone, so k-bit weights still become MatMulNBits.
`attention: true` adds the attention fusions (SDPA -> MultiHeadAttention / Attention / GroupQueryAttention);
those pack Q, K and V weights into one input that ONNX Runtime cannot run as MatMulNBits, so k-bit attention
weights are then dequantized to fp32 when the session starts.
"""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FuseConfig:
    attention: bool = False
    needs_calibration = False  # a graph pass: it sees no data

    def __post_init__(self):
        if not isinstance(self.attention, bool):
            raise ValueError(f"fuse.attention must be true or false, not {self.attention!r}")

    def label(self) -> str:
        return "layers+attention" if self.attention else "layers"


def _layer_fusions(model) -> dict[str, int]:
    from onnxscript.rewriter.ort_fusions import bias_gelu, erfgelu, gelu, rms_normalization, skip_normalization

    counts = {}
    for name, fuse in (("erf_gelu", erfgelu.fuse_erfgelu), ("rms_normalization", rms_normalization.fuse_rms_normalization),
                       ("skip_layer_normalization", skip_normalization.fuse_skip_layer_normalization),
                       ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization),
                       ("gelu", gelu.fuse_gelu), ("bias_gelu", bias_gelu.fuse_bias_gelu)):
        counts[name] = fuse(model)
    return counts


def fuse_onnx(model, config: FuseConfig, calibration=None, progress: bool = False) -> dict:
    """Fuse `model` (an onnx_ir Model, rewritten in place, as every graph pass does); returns the pass record
    (which fusions fired, how often)."""
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    if config.attention:
        fused, counts = optimize_for_ort(model)
        if fused is not model:
            raise RuntimeError("onnxscript's optimize_for_ort returned a new model instead of rewriting in place")
    else:
        counts = _layer_fusions(model)
        optimizer.remove_unused_nodes(model)
    fired = {name: int(count) for name, count in counts.items() if count}
    return {"name": "fuse", "config": asdict(config), "label": config.label(), "fusions": fired}

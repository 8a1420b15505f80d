"""Integer activations (W8A8): the inputs of int8-weight nn.Linear layers quantized too, so that ONNX Runtime
runs integer GEMMs. One home: the config, SmoothQuant's migration, calibration of static ranges with an observer,
fake quantization while the model is scored (so that the torch column of the report computes what ONNX Runtime's
integer kernels compute; passes.activation_primitives has the math), and the ONNX form of one quantized input.
SmoothQuant's migration is a pass of its own (passes.smoothquant) whose scales this scheme takes over.

What each layer gets travels with its weight record (QuantizedLayer.activation) to the exporter, which places
the same QuantizeLinear -> DequantizeLinear (or DynamicQuantizeLinear -> DequantizeLinear, activation_nodes below)
in front of its MatMul and, for SmoothQuant, the division by the smoothing scales (folded into a preceding
LayerNormalization where the graph allows: exporters.activation_qdq). Calibration data only: nothing here sees
held-out data.

Lowering, as ONNX Runtime's CPU QDQ transformer wants it: static x -> QuantizeLinear(scale, zero point) ->
DequantizeLinear -> MatMul with the weight's DequantizeLinear (int8, per channel) becomes com.microsoft
MatMulIntegerToFloat; dynamic x -> DynamicQuantizeLinear -> DequantizeLinear -> MatMul becomes
DynamicQuantizeMatMul.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from onnx import helper, numpy_helper
from torch import nn

from passes import activation_primitives as ap
from passes import quant_primitives as qp
from passes.calibration import excerpt
from passes.hooks import dividing_inputs, forward_pre_hooks, run_batches

MODES = ("none", "static", "dynamic")
INTEGER_WEIGHTS = ("uint8", "int8")
ZERO_POINT_TYPES = {"uint8": np.uint8, "int8": np.int8}


def check(fields) -> None:
    """This scheme's fields on any object holding them (IntegerActivations, or the recipe's QuantizeConfig)."""
    if fields.activations not in MODES:
        raise ValueError(f"quantize.activations must be one of {', '.join(MODES)}, not "
                         f"{excerpt(fields.activations)}")
    if fields.activation_dtype not in ap.ACTIVATION_DTYPES:
        raise ValueError(f"quantize.activation_dtype must be uint8 or int8, not {excerpt(fields.activation_dtype)}")
    if fields.integer_weights not in INTEGER_WEIGHTS:
        raise ValueError(f"quantize.integer_weights must be uint8 or int8, not {excerpt(fields.integer_weights)}")
    if fields.activation_observer not in ap.OBSERVERS:
        raise ValueError(f"quantize.activation_observer must be one of {', '.join(ap.OBSERVERS)}, not "
                         f"{excerpt(fields.activation_observer)}")
    p = fields.activation_percentile
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:  # also refuses NaN
        raise ValueError(f"quantize.activation_percentile must be in (0, 100], not {excerpt(p)}")


@dataclass(frozen=True)
class IntegerActivations:
    activations: str = "static"  # "static": one range per layer from calibration data; "dynamic": per call
    activation_dtype: str = "uint8"  # static: uint8 with a zero point (QuantizeLinear's default), or int8 symmetric
    activation_observer: str = "minmax"  # static: minmax, percentile, mse or entropy
    activation_percentile: float = 99.99  # the percentile observer's, in (0, 100]
    # how the weights are stored: "int8" (ONNX Runtime's U8S8 GEMM: fast with and without VNNI, but AVX2 CPUs
    # without VNNI saturate u8 x s8 pair sums in 16 bits unless the weights have 7 bits, `bits: 7`, as the w8a8
    # presets do) or "uint8" (codes + 128, zero point 128: the U8U8 GEMM, exact at 8 bits everywhere but 2x slower
    # than U8S8 on a VNNI Xeon, measured on MiniLM)
    integer_weights: str = "int8"

    def __post_init__(self):
        check(self)
        if self.activations == "none":
            raise ValueError("IntegerActivations needs activations static or dynamic")

    @property
    def needs_calibration(self) -> bool:
        return self.activations == "static"

    def label_parts(self) -> list[str]:
        parts = [f"a8-{self.activations}"]
        if self.activations == "static":
            parts.append(self.activation_dtype if self.activation_observer == "minmax" else
                         f"{self.activation_dtype}-{self.activation_observer}")
        return parts

    def stored_weights(self, q: qp.Quantized) -> qp.Quantized:
        """The weight codes as the integer GEMM reads them: symmetric int8 codes as uint8 ones with zero point 128
        for the U8U8 GEMM (the same values), else as they are."""
        if self.integer_weights != "uint8":
            return q
        return dataclasses.replace(q, codes=q.codes + 128,
                                   zero_points=torch.full(q.scales.shape, 128, dtype=torch.long))


@dataclass(frozen=True)
class ActivationQuant:
    """How one Linear's input is quantized: `mode` static (scale and zero point fixed from calibration) or dynamic
    (per call); `smooth`: SmoothQuant's per-input-channel scales s (the layer computes (x / s) @ (W * s)ᵀ, its
    weight already holding W * s), or None."""
    mode: str
    dtype: str = "uint8"
    scale: float = 1.0
    zero_point: int = 0
    observed: tuple[float, float] | None = None  # the extremes seen on calibration data (of x / s)
    range: tuple[float, float] | None = None  # what the observer kept
    smooth: torch.Tensor | None = None

    def record(self, module: str) -> dict:
        entry = {"module": module, "mode": self.mode}
        if self.mode == "static":
            entry.update(dtype=self.dtype, scale=self.scale, zero_point=self.zero_point,
                         observed=list(self.observed), range=list(self.range))
        if self.smooth is not None:
            entry["smooth"] = {"min": float(self.smooth.min()), "max": float(self.smooth.max())}
        return entry


def calibrate_static(model: nn.Module, layers: dict[str, nn.Linear], calibration: list[tuple],
                     smooth: dict[str, torch.Tensor], observer: str, percentile: float,
                     dtype: str) -> dict[str, ActivationQuant]:
    """One sweep of the calibration batches: each layer's input extremes and a strided sample of its values
    (after the smoothing division), then the observer's range and its 8-bit scale and zero point."""
    low = {name: float("inf") for name in layers}
    high = {name: float("-inf") for name in layers}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    per_batch = max(1, ap.SAMPLE_LIMIT // max(1, len(calibration)))

    def hook_for(name):
        def hook(_, args):
            x = args[0].detach()
            low[name] = min(low[name], float(x.min()))
            high[name] = max(high[name], float(x.max()))
            if observer != "minmax":
                samples[name].append(ap.sample_values(x, per_batch))
        return hook

    watching = forward_pre_hooks([(module, hook_for(name)) for name, module in layers.items()])
    with dividing_inputs(layers, smooth), watching:
        run_batches(model, calibration)
    found = {}
    for name in layers:
        values = torch.cat(samples[name]) if samples[name] else torch.empty(0)
        kept = ap.observed_range(values, low[name], high[name], observer, percentile, dtype)
        scale, zero = ap.static_qparams(*kept, dtype)
        found[name] = ActivationQuant("static", dtype, scale, zero, (low[name], high[name]), kept, smooth.get(name))
    return found


def _fake_quantizing(quant: ActivationQuant):
    def hook(_, args):
        x = args[0] if quant.smooth is None else args[0] / quant.smooth.to(args[0].dtype)
        x = ap.fake_quantize(x, quant.scale, quant.zero_point, quant.dtype) if quant.mode == "static" \
            else ap.fake_quantize_dynamic(x)
        return (x,) + tuple(args[1:])
    return hook


def fake_quantized_activations(model: nn.Module, quantized: dict):
    """Context: every layer whose quantize record carries an activation setting sees its input as the artifact's
    QuantizeLinear -> DequantizeLinear leaves it (smoothing division first). A no-op without such records."""
    modules = dict(model.named_modules())
    pairs = [(modules[name], _fake_quantizing(layer.activation)) for name, layer in quantized.items()
             if layer.activation is not None and name in modules]
    return forward_pre_hooks(pairs)


def activation_nodes(name: str, x: str, quant: ActivationQuant) -> tuple[list, list, str]:
    """(nodes, initializers, the dequantized tensor's name) for input `x`."""
    nodes, inits = [], []
    if quant.smooth is not None:
        inits.append(numpy_helper.from_array((1.0 / quant.smooth.double()).float().numpy(), f"{name}.inv_smooth"))
        nodes.append(helper.make_node("Mul", [x, f"{name}.inv_smooth"], [f"{name}.smoothed"], name=f"{name}.smooth"))
        x = f"{name}.smoothed"
    out = f"{name}.dequantized"
    if quant.mode == "static":
        inits += [numpy_helper.from_array(np.array(quant.scale, np.float32), f"{name}.scale"),
                  numpy_helper.from_array(np.array(quant.zero_point, ZERO_POINT_TYPES[quant.dtype]),
                                          f"{name}.zero_point")]
        parts = [f"{name}.scale", f"{name}.zero_point"]
        nodes += [helper.make_node("QuantizeLinear", [x] + parts, [f"{name}.quantized"],
                                   name=f"{name}.QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [f"{name}.quantized"] + parts, [out],
                                   name=f"{name}.DequantizeLinear")]
    else:
        parts = [f"{name}.quantized", f"{name}.scale", f"{name}.zero_point"]
        nodes += [helper.make_node("DynamicQuantizeLinear", [x], parts, name=f"{name}.DynamicQuantizeLinear"),
                  helper.make_node("DequantizeLinear", parts, [out], name=f"{name}.DequantizeLinear")]
    return nodes, inits, out

"""The quantize pass's settings (QuantizeConfig): every field checked when the recipe is read, before any
weights load; per-layer overrides are QuantizeConfigs too."""
import dataclasses
import math
from dataclasses import dataclass

import torch

from passes import activation_primitives as ap
from passes import quant_primitives as qp
from passes.bit_allocator import check_budget
from passes.calibration import check_calibration_samples, check_int, check_patterns, excerpt, matches

DTYPES = ("int", "log2", "float", "nf", "quantile", "kmeans")
SEQUENTIAL = ("layer", "block", "none")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
ZERO_POINTS = ("int", "float")
ACTIVATIONS = ("none", "static", "dynamic")
EMBEDDING_BITS = (4, 8)
# what `overrides` may change for the layers it names; selection and calibration stay the pass's own
NOT_OVERRIDABLE = ("targets", "ignore", "overrides", "sequential", "calibration_samples")
MAX_KMEANS_ITERATIONS = 10_000  # Lloyd iterations converge in tens; 10k is already minutes per large layer


@dataclass(frozen=True)
class QuantizeConfig:
    dtype: str = "int"
    bits: int = 4
    block_size: int = 64  # B along the input dim; 0 = per-channel, -1 = per-tensor
    symmetric: bool = True  # int only: absmax (True) or min-max with zero point (False)
    zero_point: str = "int"  # asymmetric int: "int" (ONNX's, 0 on a level) or "float" (block minimum, Q4_1 style)
    full_range: bool = False  # int symmetric only: also use level -2^(k-1) (Q4_0 / ORT style)
    scale_dtype: str = "float32"
    method: str = "rtn"  # or "gptq" (int only)
    exponent_bits: int | None = None  # float only; default ceil(k/2)
    codebook_scope: str = "tensor"  # quantile / kmeans: one codebook per tensor or per output row
    kmeans_iterations: int = 25
    activation_weighted: bool = False  # kmeans: weight each weight by its input channel's mean x²
    calibration_samples: int = 64
    gptq_damp: float = 0.01
    # W8A8: the Linear inputs quantized too, so that ONNX Runtime runs integer kernels (MatMulIntegerToFloat,
    # DynamicQuantizeMatMul). "static": one range per layer from calibration data; "dynamic": per call
    activations: str = "none"
    activation_dtype: str = "uint8"  # static: uint8 with a zero point (QuantizeLinear's default), or int8 symmetric
    activation_observer: str = "minmax"  # static: minmax, percentile, mse or entropy
    activation_percentile: float = 99.99  # the percentile observer's, in (0, 100]
    smoothquant_alpha: float | None = None  # SmoothQuant migration strength in [0, 1]; None: off
    # how W8A8 weights are stored: "int8" (ONNX Runtime's U8S8 GEMM: fast with and without VNNI, but AVX2 CPUs
    # without VNNI saturate u8 x s8 pair sums in 16 bits unless the weights have 7 bits, `bits: 7`, as the w8a8
    # presets do) or "uint8" (codes + 128, zero point 128: the U8U8 GEMM, exact at 8 bits everywhere but 2x slower
    # than U8S8 on a VNNI Xeon, measured on MiniLM)
    integer_weights: str = "int8"
    # nn.Embedding tables (not tied to a quantized Linear) as k-bit codes: None (float), 8 or 4 bits; block size
    # along the row (0: one scale per row; 4-bit needs blocks, for com.microsoft GatherBlockQuantized)
    embedding_bits: int | None = None
    embedding_block_size: int = 0
    # GPTQ / weighted k-means: how layers see the earlier layers' quantization. "layer": inputs re-measured before
    # each layer (one calibration pass per layer); "block": block by block, replaying only the block (GPTQ's way,
    # about two passes in all: for models of hundreds of layers); "none": one pass of the unquantized model
    sequential: str = "layer"
    targets: tuple[str, ...] = ("re:.*",)  # nn.Linear names; "re:" prefix = regular expression (search)
    ignore: tuple[str, ...] = ()
    # mixed precision: {pattern: {field: value}}; a layer takes the first pattern it matches, e.g.
    # {"re:lm_head": {"bits": 8, "block_size": 32}} keeps the output layer at 8 bits (llama.cpp's K-quant mixes)
    overrides: dict[str, dict] | None = None
    # bit-budget allocator (passes/bit_allocator.py): per-layer (dtype, k, B) from measured sensitivity so that the
    # whole model's total bits / params stays <= this; candidates as labels (int4-B64-full, nf3-B128, ...)
    budget_bits_per_param: float | None = None
    budget_candidates: tuple[str, ...] = ()  # empty: bit_allocator.DEFAULT_CANDIDATES

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"quantize.dtype must be one of {', '.join(DTYPES)}, not {excerpt(self.dtype)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"quantize.bits must be an integer in 2..8, not {excerpt(self.bits)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or (
                self.block_size not in (qp.PER_CHANNEL, qp.PER_TENSOR) and (
                self.block_size < 16 or self.block_size > 1024 or self.block_size & (self.block_size - 1))):
            raise ValueError(f"quantize.block_size must be a power of two in 16..1024, 0 (per-channel) or -1 "
                             f"(per-tensor), not {excerpt(self.block_size)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"quantize.scale_dtype must be float32 or float16, not {excerpt(self.scale_dtype)}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"quantize.method must be rtn or gptq, not {excerpt(self.method)}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"quantize.zero_point must be int or float, not {excerpt(self.zero_point)}")
        for name in ("symmetric", "full_range", "activation_weighted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantize.{name} must be true or false, not {excerpt(getattr(self, name))}")
        if self.exponent_bits is not None:  # a float of 2..8 bits has 1 sign bit and 1..7 exponent bits
            check_int("quantize.exponent_bits", self.exponent_bits, 1, 7)
        if self.zero_point == "float" and (self.dtype != "int" or self.symmetric or self.block_size <= 0):
            raise ValueError("quantize.zero_point=float needs dtype=int, symmetric=false and a block size")
        if self.zero_point == "float" and self.method != "rtn":
            raise ValueError("quantize.zero_point=float works with method=rtn only")
        if self.method == "gptq" and self.dtype != "int":
            raise ValueError("quantize.method=gptq works with dtype=int only")
        if self.method == "gptq" and self.block_size == qp.PER_TENSOR:
            raise ValueError("quantize.method=gptq needs per-channel (0) or block-wise scales")
        if self.dtype == "float":
            qp.float_codebook(self.bits, self.exponent_bits)  # raises on an impossible split
        if self.codebook_scope not in ("tensor", "row"):
            raise ValueError(f"quantize.codebook_scope must be tensor or row, not {excerpt(self.codebook_scope)}")
        check_int("quantize.kmeans_iterations", self.kmeans_iterations, 1, MAX_KMEANS_ITERATIONS)
        if isinstance(self.gptq_damp, bool) or not 0 < self.gptq_damp < math.inf:  # also refuses NaN
            raise ValueError(f"quantize.gptq_damp must be a positive number, not {excerpt(self.gptq_damp)}")
        if self.sequential not in SEQUENTIAL:
            raise ValueError(f"quantize.sequential must be one of {', '.join(SEQUENTIAL)}, not "
                             f"{excerpt(self.sequential)}")
        check_calibration_samples("quantize", self.calibration_samples)
        check_patterns("quantize", targets=self.targets, ignore=self.ignore)
        self._check_activations()
        self._check_embeddings()
        check_budget(self)
        self._check_overrides()

    def _check_overrides(self) -> None:
        if self.overrides is None:
            return
        if not isinstance(self.overrides, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.overrides.items()):
            raise ValueError("quantize.overrides must map module names / re: patterns to {field: value} mappings, "
                             f"not {excerpt(self.overrides)}")
        check_patterns("quantize", overrides=tuple(self.overrides))
        known = {f.name for f in dataclasses.fields(self)}
        for pattern, fields in self.overrides.items():
            for key in fields:
                if key in NOT_OVERRIDABLE or key not in known:
                    raise ValueError(f"quantize.overrides[{excerpt(pattern)}]: {excerpt(key)} cannot be overridden "
                                     f"per layer (allowed: {', '.join(sorted(known - set(NOT_OVERRIDABLE)))})")
            try:
                dataclasses.replace(self, overrides=None, **fields)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"quantize.overrides[{excerpt(pattern)}]: {exc}") from None

    def _check_activations(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"quantize.activations must be one of {', '.join(ACTIVATIONS)}, not "
                             f"{excerpt(self.activations)}")
        if self.activation_dtype not in ap.ACTIVATION_DTYPES:
            raise ValueError(f"quantize.activation_dtype must be uint8 or int8, not {excerpt(self.activation_dtype)}")
        if self.integer_weights not in ("uint8", "int8"):
            raise ValueError(f"quantize.integer_weights must be uint8 or int8, not {excerpt(self.integer_weights)}")
        if self.activation_observer not in ap.OBSERVERS:
            raise ValueError(f"quantize.activation_observer must be one of {', '.join(ap.OBSERVERS)}, not "
                             f"{excerpt(self.activation_observer)}")
        p = self.activation_percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:  # also refuses NaN
            raise ValueError(f"quantize.activation_percentile must be in (0, 100], not {excerpt(p)}")
        alpha = self.smoothquant_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0 <= alpha <= 1):
            raise ValueError(f"quantize.smoothquant_alpha must be in [0, 1] (or null: off), not {excerpt(alpha)}")
        if alpha is not None and self.activations == "none":
            raise ValueError("quantize.smoothquant_alpha needs quantize.activations static or dynamic: smoothing "
                             "only pays when the activations are quantized")
        if self.activations != "none" and not (self.dtype == "int" and self.bits in (7, 8) and self.symmetric
                                               and self.block_size in (qp.PER_CHANNEL, qp.PER_TENSOR)):
            raise ValueError(f"quantize.activations={self.activations} needs int8 symmetric weights per channel or "
                             f"per tensor (dtype int, bits 8 or 7, symmetric, block_size 0 or -1), not {self._own_label()}: "
                             "ONNX Runtime's integer MatMul kernels take no blocked or narrower weights")

    def _check_embeddings(self) -> None:
        if self.embedding_bits is not None and (isinstance(self.embedding_bits, bool)
                                                or self.embedding_bits not in EMBEDDING_BITS):
            raise ValueError(f"quantize.embedding_bits must be 8, 4 or null (float tables), not "
                             f"{excerpt(self.embedding_bits)}")
        block = self.embedding_block_size
        if isinstance(block, bool) or not isinstance(block, int) or (block != qp.PER_CHANNEL and (
                block < 16 or block > 1024 or block & (block - 1))):
            raise ValueError(f"quantize.embedding_block_size must be 0 (one scale per row) or a power of two in "
                             f"16..1024, not {excerpt(block)}")
        if self.embedding_bits == 4 and block == qp.PER_CHANNEL:
            raise ValueError("quantize.embedding_bits=4 needs an embedding_block_size (16..1024, e.g. 32): "
                             "4-bit rows are looked up by com.microsoft GatherBlockQuantized, which takes blocks")

    def for_layer(self, name: str) -> "QuantizeConfig":
        """This config with the first matching override applied (the pass's own config when none matches)."""
        for pattern, fields in (self.overrides or {}).items():
            if matches(name, (pattern,)):
                return dataclasses.replace(self, overrides=None, **fields)
        return self

    def layer_configs(self) -> list["QuantizeConfig"]:
        return [self] + [dataclasses.replace(self, overrides=None, **f) for f in (self.overrides or {}).values()]

    @property
    def input_multiple(self) -> int | None:
        """What must divide a layer's in_features for it to be quantized (blocks run along the input dim). Plain
        int rounding takes a shorter last block (ONNX's ceil(K / B) blocks); codebooks and GPTQ need whole ones."""
        if self.block_size <= 0 or (self.dtype == "int" and self.method == "rtn"):
            return None
        return self.block_size

    @property
    def needs_calibration(self) -> bool:
        if self.budget_bits_per_param is not None:  # the allocator measures sensitivity on calibration data
            return True
        return any(c.method == "gptq" or (c.dtype == "kmeans" and c.activation_weighted)
                   or c.activations == "static" or c.smoothquant_alpha is not None for c in self.layer_configs())

    def label(self) -> str:
        if self.budget_bits_per_param is not None:
            return f"budget {self.budget_bits_per_param:g} bits/param"
        base = self._own_label()
        if not self.overrides:
            return base
        others = ", ".join(f"{pattern.removeprefix('re:')}: "
                           f"{dataclasses.replace(self, overrides=None, **fields)._own_label()}"
                           for pattern, fields in self.overrides.items())
        return f"{base} ({others})"

    def _own_label(self) -> str:
        granularity = {0: "channel", -1: "tensor"}.get(self.block_size, f"B{self.block_size}")
        name = "log" if self.dtype == "log2" else self.dtype
        parts = [f"{name}{self.bits}", granularity]
        if self.dtype == "int" and not self.symmetric:
            parts.append("asym" if self.zero_point == "int" else "asym-fzp")
        if self.dtype == "int" and self.symmetric and self.full_range:
            parts.append("full")
        if self.dtype == "kmeans" and self.activation_weighted:
            parts.append("aw")
        if self.dtype in ("quantile", "kmeans") and self.codebook_scope == "row":
            parts.append("row")
        if self.method == "gptq":
            parts.append("gptq")
        if self.activations != "none":
            parts.append(f"a8-{self.activations}")
            if self.activations == "static":
                parts.append(self.activation_dtype if self.activation_observer == "minmax" else
                             f"{self.activation_dtype}-{self.activation_observer}")
        if self.smoothquant_alpha is not None:
            parts.append(f"sq{self.smoothquant_alpha:g}")
        if self.embedding_bits is not None:
            parts.append(f"emb{self.embedding_bits}")
        return "-".join(parts)

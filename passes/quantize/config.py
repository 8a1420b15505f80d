"""The quantize pass's settings as a recipe writes them (QuantizeConfig: one flat `quantize:` section, so that
every recipe written so far still loads), checked when the recipe is read, before any weights load. Each layer's
settings resolve into the schemes that do the work, each with its own home: passes.quantize.int_weights
(IntWeights), passes.quantize.codebook (CodebookWeights), passes.quantize.activations (IntegerActivations) and
passes.quantize.embeddings (EmbeddingTables). Per-layer overrides are QuantizeConfigs too."""
import dataclasses
from dataclasses import dataclass

from passes import quant_primitives as qp
from passes.bit_allocator import check_budget
from passes.calibration import check_calibration_samples, check_patterns, excerpt, matches
from passes.quantize import activations, codebook, embeddings, int_weights
from passes.quantize.activations import IntegerActivations
from passes.quantize.codebook import CodebookWeights
from passes.quantize.embeddings import EmbeddingTables
from passes.quantize.int_weights import IntWeights

DTYPES = ("int",) + codebook.DTYPES
SEQUENTIAL = ("layer", "block", "none")
# what `overrides` may change for the layers it names; selection and calibration stay the pass's own
NOT_OVERRIDABLE = ("targets", "ignore", "overrides", "sequential", "calibration_samples")
INT_FIELDS = tuple(f.name for f in dataclasses.fields(IntWeights))
CODEBOOK_FIELDS = tuple(f.name for f in dataclasses.fields(CodebookWeights))
ACTIVATION_FIELDS = tuple(f.name for f in dataclasses.fields(IntegerActivations))


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
    scale_search: str = "none"  # int: "mse" / "activation" search each group's scale (passes.quantize.int_weights)
    # W8A8: the Linear inputs quantized too, so that ONNX Runtime runs integer kernels (MatMulIntegerToFloat,
    # DynamicQuantizeMatMul). "static": one range per layer from calibration data; "dynamic": per call
    activations: str = "none"
    activation_dtype: str = "uint8"  # static: uint8 with a zero point (QuantizeLinear's default), or int8 symmetric
    activation_observer: str = "minmax"  # static: minmax, percentile, mse or entropy
    activation_percentile: float = 99.99  # the percentile observer's, in (0, 100]
    # how W8A8 weights are stored: "int8" (ONNX Runtime's U8S8 GEMM: fast with and without VNNI, but AVX2 CPUs
    # without VNNI saturate u8 x s8 pair sums in 16 bits unless the weights have 7 bits, `bits: 7`, as the w8a8
    # presets do) or "uint8" (codes + 128, zero point 128: the U8U8 GEMM, exact at 8 bits everywhere but 2x slower
    # than U8S8 on a VNNI Xeon, measured on MiniLM)
    integer_weights: str = "int8"
    # nn.Embedding tables (not tied to a quantized Linear) as k-bit codes: None (float), 8 or 4 bits; block size
    # along the row (0: one scale per row; 4-bit needs blocks, for com.microsoft GatherBlockQuantized)
    embedding_bits: int | None = None
    embedding_block_size: int = 0
    # a table tied to a quantized Linear (lm_head): "copy" (the lookup's own codes beside the Linear's) or "shared"
    # (stored once, the lookup reading the Linear's codes: passes.quantize.embeddings.TIED_TABLES)
    tied_table: str = "copy"
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
        int_weights.check(self)
        codebook.check(self)
        if self.zero_point == "float" and self.dtype != "int":
            raise ValueError("quantize.zero_point=float needs dtype=int, symmetric=false and a block size")
        if self.method == "gptq" and self.dtype != "int":
            raise ValueError("quantize.method=gptq works with dtype=int only")
        self.weight_scheme()  # the scheme's own cross-field checks
        if self.sequential not in SEQUENTIAL:
            raise ValueError(f"quantize.sequential must be one of {', '.join(SEQUENTIAL)}, not "
                             f"{excerpt(self.sequential)}")
        check_calibration_samples("quantize", self.calibration_samples)
        check_patterns("quantize", targets=self.targets, ignore=self.ignore)
        self._check_activations()
        embeddings.check(self)
        embeddings.check_tied_table(self.tied_table)
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
        activations.check(self)
        if self.activations != "none" and not (self.dtype == "int" and self.bits in (7, 8) and self.symmetric
                                               and self.block_size in (qp.PER_CHANNEL, qp.PER_TENSOR)):
            raise ValueError(f"quantize.activations={self.activations} needs int8 symmetric weights per channel or "
                             f"per tensor (dtype int, bits 8 or 7, symmetric, block_size 0 or -1), not {self._own_label()}: "
                             "ONNX Runtime's integer MatMul kernels take no blocked or narrower weights")

    def weight_scheme(self) -> IntWeights | CodebookWeights:
        """The weight scheme these settings name (this config's own; per layer: for_layer(name).weight_scheme())."""
        if self.dtype == "int":
            return IntWeights(**{name: getattr(self, name) for name in INT_FIELDS})
        return CodebookWeights(**{name: getattr(self, name) for name in CODEBOOK_FIELDS})

    def activation_scheme(self) -> IntegerActivations | None:
        """How the layers' inputs are quantized, or None (weights only)."""
        if self.activations == "none":
            return None
        return IntegerActivations(**{name: getattr(self, name) for name in ACTIVATION_FIELDS})

    def embedding_scheme(self) -> EmbeddingTables | None:
        """How untied nn.Embedding tables are stored, or None (float)."""
        if self.embedding_bits is None:
            return None
        return EmbeddingTables(self.embedding_bits, self.embedding_block_size, self.scale_dtype)

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
        """What must divide a layer's in_features for it to be quantized (blocks run along the input dim)."""
        return self.weight_scheme().input_multiple

    @property
    def needs_calibration(self) -> bool:
        if self.budget_bits_per_param is not None:  # the allocator measures sensitivity on calibration data
            return True
        return any(c.weight_scheme().needs_statistics or c.activations == "static" for c in self.layer_configs())

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
        parts = self.weight_scheme().label_parts()
        activation = self.activation_scheme()
        if activation is not None:
            parts += activation.label_parts()
        embedding = self.embedding_scheme()
        if embedding is not None:
            parts += embedding.label_parts()
        return "-".join(parts)

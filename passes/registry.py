"""Every pass in one table: its name, stage, what it rewrites, its config dataclass and its function. Recipes,
`compress passes`, the pipeline and the input adapters read this table and nothing else about passes.

One signature for all: `run(target, config, calibration, progress) -> record`, and one protocol for configs
(PassConfig: frozen, checked in __post_init__, says whether it needs calibration data and labels itself). A torch pass rewrites an
nn.Module in place, a graph pass an onnx_ir Model in place; the record (a dict) is the pass's entry in the
report. The quantize pass's record also carries `quantized` ({module name: QuantizedLayer}), which the pipeline
takes out of the record and hands to the QDQ exporter.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from passes.fuse import FuseConfig, fuse_onnx
from passes.heal import HealConfig, heal_model
from passes.lowrank import LowRankConfig, factorizable, lowrank_model
from passes.prune import PruneConfig, prunable, prune_model
from passes.quantize import QuantizeConfig, quantizable, quantize_model
from passes.smoothquant import SmoothQuantConfig, smoothable, smoothquant_model
from passes.structured_prune import StructuredPruneConfig, structured_prunable, structured_prune_model

TORCH, GRAPH = "torch", "graph"


class PassConfig(Protocol):
    """What the pipeline, recipes and the CLI may ask of any pass's config (a frozen dataclass)."""
    @property
    def needs_calibration(self) -> bool: ...  # calibration batches (calibration_samples of them) must be drawn

    def label(self) -> str: ...  # a short name for logs and reports


@dataclass(frozen=True)
class PassSpec:
    name: str
    stage: int  # recipes run passes in stage order: prune -> low-rank / heal -> smoothquant -> quantize -> fuse
    rewrites: str  # TORCH (the nn.Module, before export) or GRAPH (the exported ONNX model)
    config: type[PassConfig]
    run: Callable
    # the layers it would touch, from shapes alone (works on a meta-device model): ValueError when none
    select: Callable | None = None
    reshapes: bool = False  # changes layer shapes, so passes after it are checked only when they run


PASSES: dict[str, PassSpec] = {spec.name: spec for spec in (
    PassSpec("prune", 0, TORCH, PruneConfig, prune_model, select=prunable),
    PassSpec("structured_prune", 0, TORCH, StructuredPruneConfig, structured_prune_model,
             select=structured_prunable, reshapes=True),
    PassSpec("lowrank", 1, TORCH, LowRankConfig, lowrank_model, select=factorizable, reshapes=True),
    PassSpec("heal", 1, TORCH, HealConfig, heal_model),
    PassSpec("smoothquant", 2, TORCH, SmoothQuantConfig, smoothquant_model, select=smoothable),
    PassSpec("quantize", 3, TORCH, QuantizeConfig, quantize_model, select=quantizable),
    PassSpec("fuse", 4, GRAPH, FuseConfig, fuse_onnx),
)}

STAGE_ORDER = " -> ".join("/".join(p.name for p in PASSES.values() if p.stage == stage)
                          for stage in sorted({p.stage for p in PASSES.values()}))

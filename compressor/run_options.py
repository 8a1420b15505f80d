"""What a `compress run` is asked to do besides its input and output folder."""
from dataclasses import dataclass, field

from compressor.recipes import Recipe
from compressor.validate import BenchmarkSettings


@dataclass(frozen=True)
class RunOptions:
    recipe: str | Recipe = "fp32"  # a preset name or YAML path (then `overrides` apply), or a built Recipe
    overrides: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("cpu",)
    eval_limit: int | None = None  # None: the whole held-out split
    seed: int = 0
    force: bool = False
    bench: BenchmarkSettings | None = field(default_factory=BenchmarkSettings)  # None: no latency runs (sweeps)
    progress: bool = True
    # the input model's held-out metrics at this eval_limit, from an earlier run on the same input: a sweep measures
    # them once, not once per configuration (tasks that fit a reference on the input model, e.g. a probe, re-measure)
    reference_metrics: dict | None = None
    plots: bool = True  # the report's PNG plots (a sweep draws its own, over all its runs)
    # a decoder read and written one layer at a time (compressor.streaming): None lets streaming.chosen decide
    stream: bool | None = None
    max_memory: int | None = None  # bytes a streamed run may use; None: what the machine has available

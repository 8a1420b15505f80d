"""The Python API, what `compress run` calls: compress(source, recipe, out) -> the report (a dict, also written as
out/report.json and out/report.md beside out/model.onnx).

    import compressor
    from passes.quantize import QuantizeConfig

    report = compressor.compress("gpt-m", [QuantizeConfig(bits=4, block_size=32)], "runs/api")
    report["summary"]

`source`: a path (our checkpoint folder or a sample's name, a Hugging Face folder or GGUF file, an fp32 ONNX
model) or an nn.Module of the sample families (the passes work on a copy). `recipe`: a preset name or YAML path
(as `compress run --recipe`), a compressor.recipes.Recipe, or the pass configs themselves (QuantizeConfig,
PruneConfig, ...: passes.registry.PASSES names them), run in stage order. Errors a user can fix raise
compressor.errors.UserError with one line; a failed gate does not raise: report["gates"] says so.
"""
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from compressor.errors import UserError
from compressor.inputs.module import module_adapter
from compressor.pipeline import RunOptions, run
from compressor.recipes import Export, Gates, Recipe
from compressor.validate import BenchmarkSettings
from passes.registry import PASSES


def compress(source: str | Path | nn.Module, recipe: str | Path | Recipe | Sequence[object] = "fp32",
             out: str | Path = "runs/compressed", *, overrides: Sequence[str] = (), gates: Gates | None = None,
             export: Export | None = None, seed: int = 0, providers: Sequence[str] = ("cpu",),
             eval_limit: int | None = None, bench: BenchmarkSettings | None = BenchmarkSettings(),
             force: bool = False, progress: bool = False, stream: bool | None = None,
             max_memory: int | None = None, log=print) -> dict:
    """Compress `source` by `recipe` into the folder `out`; returns the report. `overrides`: `--set` strings
    (e.g. "quantize.bits=3") for a preset or YAML recipe; `gates` / `export`: for a recipe given as pass configs;
    `bench=None` skips the latency and generation benchmarks. `stream`: read and write a Llama-family decoder one
    layer at a time (None: past 1 GiB of fp32 weights); `max_memory`: the bytes such a run may use."""
    if not isinstance(recipe, (str, Path, Recipe)):
        recipe = recipe_of(recipe, gates or Gates(), export or Export())
    elif gates is not None or export is not None:
        raise UserError("gates= and export= go with a recipe given as pass configs; a preset or YAML recipe takes "
                        "them as overrides (gates.KEY=VALUE, export.KEY=VALUE)")
    options = RunOptions(recipe=str(recipe) if isinstance(recipe, Path) else recipe, overrides=tuple(overrides),
                         providers=tuple(dict.fromkeys(providers)), eval_limit=eval_limit, seed=seed, force=force,
                         bench=bench, progress=progress, stream=stream, max_memory=max_memory)
    if isinstance(source, nn.Module):
        name = type(source).__name__
        return run(Path(name), Path(out), options, log=log, adapter=module_adapter(source, name))
    return run(Path(source), Path(out), options, log=log)


def recipe_of(configs: Sequence[object], gates: Gates = Gates(), export: Export = Export()) -> Recipe:
    """A Recipe from pass configs (each pass at most once), in stage order."""
    by_type = {spec.config: name for name, spec in PASSES.items()}
    named = []
    for config in configs:
        name = by_type.get(type(config))
        if name is None:
            raise UserError(f"{type(config).__name__} is not a pass config (known: "
                            f"{', '.join(spec.config.__name__ for spec in PASSES.values())})")
        if name in dict(named):
            raise UserError(f"pass {name!r} is given twice")
        named.append((name, config))
    named.sort(key=lambda entry: PASSES[entry[0]].stage)
    label = " + ".join(f"{name} {config.label()}" for name, config in named) or "fp32"
    return Recipe(label, tuple(named), gates, export)

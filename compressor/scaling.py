"""`compress scaling`: a k-bit grid (data type x bits x block size, plus bit-budget allocator runs) swept over one
checkpoint, each configuration through the one pipeline (compressor.pipeline.run: the fp32 recipe plus quantize
overrides), its metric measured in ONNX Runtime on its artifact and its total model bits read from its report;
then the Pareto front and the best run per bit budget (k-bit inference scaling laws, Dettmers & Zettlemoyer 2023).

Resumable: each finished configuration's result is stored in OUT/runs/<label>.json with a fingerprint of what
determines it (the checkpoint's files, the recipe, eval limit, seed, compressor version); a rerun reuses a result
whose fingerprint matches and measures again one whose fingerprint does not."""
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from compressor.version import __version__
from compressor.atomic import atomic_write_text
from compressor.errors import UserError
from compressor.ort_runtime import headline_provider
from compressor.pareto import SUMMARY_KEYS, best_per_budget, best_under, pareto_front  # noqa: F401  (tests use them from here)
from passes.quantize.labels import granularity, weight_label

DTYPES = ("int", "nf", "float", "quantile", "kmeans", "log2")
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_BLOCK_SIZES = (32, 64, 128, 0)  # 0: one scale per output channel ("channel" on the command line)
# 64 windows of 128 held-out tokens (8 KiB of text for the GPT samples): every configuration is scored on the
# same windows, so differences between them are paired; enough to order 4-bit configurations on gpt-l, and a
# twelfth of the per-config time of the whole held-out split
DEFAULT_EVAL_LIMIT = 64
# budget runs: the int4 preset's quantize fields, spelled out on the fp32 recipe (so that the preset gaining fields,
# e.g. k-bit embeddings, cannot make budget runs differ from the uniform grid in more than the Linear layers' choice),
# plus quantize.budget_bits_per_param (the allocator's field)
BUDGET_BASE = ("quantize.dtype=int", "quantize.bits=4", "quantize.block_size=64", "quantize.full_range=true")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SweepConfig:
    """One point of the sweep: a uniform (dtype, bits, block_size) or an allocator run at `budget` bits/param."""
    dtype: str | None = None
    bits: int | None = None
    block_size: int | None = None
    budget: float | None = None

    @property
    def label(self) -> str:
        if self.budget is not None:  # 6 significant digits where they name the budget exactly, else all of them:
            short = f"{self.budget:g}"  # two budgets never share a label (and so a result file)
            return f"budget-{short if float(short) == self.budget else repr(self.budget)}"
        return weight_label(self.dtype, self.bits, self.block_size)  # as the quantize pass labels it: log4-B64

    recipe = "fp32"

    @property
    def overrides(self) -> tuple[str, ...]:
        if self.budget is not None:
            return BUDGET_BASE + (f"quantize.budget_bits_per_param={self.budget!r}",)
        return (f"quantize.dtype={self.dtype}", f"quantize.bits={self.bits}", f"quantize.block_size={self.block_size}")


@dataclass(frozen=True)
class Grid:
    dtypes: tuple[str, ...] = DTYPES
    bits: tuple[int, ...] = DEFAULT_BITS
    block_sizes: tuple[int, ...] = DEFAULT_BLOCK_SIZES
    budgets: tuple[float, ...] = ()

    def configs(self) -> list[SweepConfig]:
        uniform = [SweepConfig(d, b, s) for d in self.dtypes for b in self.bits for s in self.block_sizes]
        return uniform + [SweepConfig(budget=x) for x in self.budgets]


@dataclass(frozen=True)
class Settings:
    """What, besides the configuration, determines a run's numbers."""
    eval_limit: int | None = DEFAULT_EVAL_LIMIT
    seed: int = 0


def block_name(block_size: int | None) -> str:
    return "-" if block_size is None else granularity(block_size)


def _items(option: str, values) -> list[str]:
    """A comma list or a repeated option (or both) as its items; empty items dropped."""
    values = [values] if isinstance(values, str) else list(values)
    items = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    if not items:
        raise UserError(f"{option}: empty list")
    return list(dict.fromkeys(items))  # duplicates once, in the order given


def parse_grid(dtypes="int,nf,float,quantile,kmeans,log2", bits="2,3,4,5,6,8", block_sizes="32,64,128,channel",
               budgets=()) -> Grid:
    """The command line's lists as a Grid; one-line UserErrors for anything outside what the quantizer takes."""
    names = _items("--dtypes", dtypes)
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise UserError(f"--dtypes: unknown data type {unknown[0][:40]!r} (known: {', '.join(DTYPES)})")
    bit_list = []
    for item in _items("--bits", bits):
        if not _ascii_digits(item) or not 2 <= int(item) <= 8:
            raise UserError(f"--bits: {item[:40]!r} is not an integer in 2..8")
        bit_list.append(int(item))
    blocks = []
    for item in _items("--block-sizes", block_sizes):
        value = 0 if item == "channel" else int(item) if _ascii_digits(item) else None
        if value is None or (value != 0 and not (16 <= value <= 1024 and value & (value - 1) == 0)):
            raise UserError(f"--block-sizes: {item[:40]!r} is not a power of two in 16..1024 or 'channel'")
        blocks.append(value)
    budget_list = []
    for item in (_items("--budget", budgets) if budgets else []):
        value = float(item) if _DECIMAL.fullmatch(item) else math.nan  # float() also reads '١', '1_0', 'inf'
        if not (0 < value <= 32):  # also refuses NaN; 32 bits/param is the fp32 input itself
            raise UserError(f"--budget: {item[:40]!r} is not a number of bits per parameter in (0, 32]")
        budget_list.append(value)
    return Grid(tuple(names), tuple(dict.fromkeys(bit_list)), tuple(dict.fromkeys(blocks)),
                tuple(dict.fromkeys(budget_list)))


def _ascii_digits(item: str) -> bool:
    """0-9 only: str.isdigit() also takes '²' (which int() refuses) and '٣' (which int() reads as 3)."""
    return item.isascii() and item.isdigit() and len(item) <= 6


_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")


def allocator_available() -> bool:
    from passes.quantize import QuantizeConfig

    return "budget_bits_per_param" in {f.name for f in dataclasses.fields(QuantizeConfig)}


def check_grid(grid: Grid) -> list[SweepConfig]:
    """Every configuration's recipe resolved (and so checked by the pass's own config) before any model loads."""
    from compressor.recipes import resolve_recipe

    if grid.budgets and not allocator_available():
        raise UserError("--budget: the bit-budget allocator (quantize.budget_bits_per_param) is not available in "
                        "this install")
    configs = grid.configs()
    for config in configs:
        try:
            resolve_recipe(config.recipe, config.overrides)
        except UserError as exc:
            raise UserError(f"{config.label} cannot be run: {exc}") from None
    return configs


def checkpoint_identity(checkpoint: Path) -> dict:
    """What names the input for the fingerprint: its resolved path and the size and mtime of its files (hashing
    a real model's gigabytes on every rerun would cost more than it protects)."""
    from compressor.inputs import adapter_for

    path, adapter = adapter_for(Path(checkpoint))
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"path": str(path.resolve()), "kind": adapter.kind,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def fingerprint(identity: dict, config: SweepConfig, settings: Settings) -> str:
    payload = {"checkpoint": identity, "recipe": config.recipe, "overrides": list(config.overrides),
               "settings": dataclasses.asdict(settings), "compressor": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One configuration to measure, as a worker (this process or a Ray task) needs it; plain data throughout."""
    checkpoint: str
    config: SweepConfig
    out_dir: str  # the run's own folder: OUT/runs/<label>
    settings: Settings
    reference_metrics: dict | None
    fingerprint: str


_LOADED: dict[str, object] = {}  # per process: checkpoint -> an adapter handing out copies of one load


def reusing_adapter(checkpoint: str):
    """An input adapter that reads the checkpoint once per process (a worker's first configuration) and hands
    every run a deep copy of the model, which the passes rewrite in place: the same weights as a fresh load, without
    144 loads and checks of the same files. None for an ONNX input, whose export writes back into its graph."""
    from compressor.inputs import adapter_for

    if checkpoint not in _LOADED:
        path, adapter = adapter_for(Path(checkpoint))
        memo = {}

        def skeleton(p):
            if "skeleton" not in memo:
                memo["skeleton"] = adapter.skeleton(p)
            return memo["skeleton"]

        def load(p, progress):
            if "source" not in memo:
                memo["source"] = adapter.load(p, progress)
            return dataclasses.replace(memo["source"], model=copy.deepcopy(memo["source"].model))

        _LOADED[checkpoint] = None if adapter.kind == "onnx" else dataclasses.replace(adapter, skeleton=skeleton,
                                                                                          load=load)
    return _LOADED[checkpoint]


def measure_job(job: Job) -> dict:
    """Run one configuration through the pipeline (no latency benchmark, no per-run plots) and return its result
    row; a configuration the pipeline refuses for this model (e.g. a block size that divides no layer) comes back
    as skipped, with the reason."""
    from compressor.artifact import CannotWrite
    from compressor.pipeline import RunOptions, run

    config = job.config
    row = {"label": config.label, "dtype": config.dtype, "bits": config.bits,
           "block_size": block_name(config.block_size) if config.block_size is not None else None,
           "budget_bits_per_param": config.budget, "recipe": config.recipe, "overrides": list(config.overrides)}
    options = RunOptions(recipe=config.recipe, overrides=config.overrides, eval_limit=job.settings.eval_limit,
                         seed=job.settings.seed, force=True, bench=None, progress=False,
                         reference_metrics=job.reference_metrics, plots=False)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        report = run(Path(job.checkpoint), Path(job.out_dir), options, log=lambda _: None,
                     adapter=reusing_adapter(job.checkpoint))
        row.update(status="ok", **_from_report(report))
    except CannotWrite:  # a full disk is not a property of the configuration: stop, store nothing
        raise
    except UserError as exc:
        row.update(status="skipped", reason=str(exc))
    # CPU seconds of all this process's threads: what the run costs whatever else loads the machine
    return {**row, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}


def _from_report(report: dict) -> dict:
    accuracy = report["accuracy"]
    provider = headline_provider(accuracy["onnxruntime"])
    quantize = next((p for p in report["passes"] if p["name"] == "quantize"), {})
    allocation = {k: v for k, v in quantize.items() if k.startswith(("budget", "allocation"))}
    return {"total_model_bits": report["total_model_bits"], "bits_per_param": report["bits_per_param"],
            "params": report["model"]["params"], "metric_name": accuracy["metric"],
            "higher_is_better": accuracy["higher_is_better"], "metric": accuracy["onnxruntime"][provider],
            "measured_by": f"onnxruntime-{provider}", "metric_torch": accuracy["torch"],
            "reference_metrics": accuracy["reference_metrics"],
            "quantize_label": quantize.get("label"), "layers_quantized": len(quantize.get("layers", [])),
            "layers_skipped": len(quantize.get("skipped", [])),
            "artifact_bytes": report["artifact"]["bytes"], "artifact_sha256": report["artifact"]["sha256"],
            **({"allocation": allocation} if allocation else {})}



# the sweep


def _result_path(out_dir: Path, label: str) -> Path:
    return out_dir / "runs" / f"{label}.json"


def stored_result(out_dir: Path, config: SweepConfig, expected: str) -> dict | None:
    """A finished configuration's stored row if its fingerprint matches and it holds what the sweep reads of it,
    else None (never stored, another checkpoint or other settings, an edited or truncated file: measured again)."""
    path = _result_path(out_dir, config.label)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(stored, dict) or stored.get("fingerprint") != expected or not _usable_row(stored.get("row"),
                                                                                                 config):
        return None
    return stored["row"]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# what the summary, the Pareto front and scaling.md read of a measured row: key -> test of its value
_MEASURED_ROW = {"total_model_bits": lambda v: _number(v) and 0 < v < math.inf,
                 "bits_per_param": lambda v: _number(v) and 0 < v < math.inf,
                 "params": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 "metric": _number, "metric_name": lambda v: isinstance(v, str),
                 "higher_is_better": lambda v: isinstance(v, bool), "measured_by": lambda v: isinstance(v, str),
                 "reference_metrics": lambda v: isinstance(v, dict) and all(
                     isinstance(k, str) and _number(x) and math.isfinite(x) for k, x in v.items()),
                 "layers_skipped": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0}
_OPTIONAL = {"seconds": _number, "cpu_seconds": _number, "quantize_label": lambda v: v is None or isinstance(v, str)}


def _usable_row(row, config: SweepConfig) -> bool:
    """A stored row is this configuration's (its label and grid point) and holds, with the right types, every
    value the sweep reads of it."""
    if not isinstance(row, dict):
        return False
    identity = {"label": config.label, "dtype": config.dtype, "bits": config.bits,
                "block_size": block_name(config.block_size) if config.block_size is not None else None,
                "budget_bits_per_param": config.budget}
    if any(row.get(key, object()) != value or type(row.get(key)) is not type(value)
           for key, value in identity.items()):
        return False
    if not all(test(row[key]) for key, test in _OPTIONAL.items() if key in row):
        return False
    if row.get("status") == "skipped":
        return isinstance(row.get("reason"), str)
    return (row.get("status") == "ok" and all(key in row and test(row[key]) for key, test in _MEASURED_ROW.items())
            and row["metric_name"] in row["reference_metrics"])


def store_result(out_dir: Path, job: Job, row: dict) -> None:
    atomic_write_text(_result_path(out_dir, job.config.label),
                      json.dumps({"fingerprint": job.fingerprint, "row": row}, indent=1) + "\n")


def sweep(checkpoint: Path, out_dir: Path, grid: Grid, settings: Settings = Settings(), workers: int = 1,
          ray_address: str | None = None, progress: bool = True, log=print) -> dict:
    """Measure every configuration of `grid` not already stored in out_dir, write out_dir/scaling.json,
    scaling.md and the plots; returns the scaling.json content."""
    from tqdm import tqdm

    from compressor.artifact import locked_out_dir, real_names
    from compressor.scaling_report import write_outputs

    configs = check_grid(grid)  # a bad grid fails here, before any model loads
    parallel = workers > 1 or ray_address is not None
    if parallel:
        from compressor.scaling_ray import check_ray

        check_ray()
    out_dir = Path(out_dir)
    _check_outputs(out_dir, configs)
    identity = checkpoint_identity(checkpoint)
    started = time.perf_counter()
    with locked_out_dir(out_dir), real_names(out_dir):
        (out_dir / "runs").mkdir(exist_ok=True)
        jobs = [Job(str(checkpoint), c, str(out_dir / "runs" / c.label), settings, None,
                    fingerprint(identity, c, settings)) for c in configs]
        rows = {job.config.label: stored_result(out_dir, job.config, job.fingerprint) for job in jobs}
        pending = [job for job in jobs if rows[job.config.label] is None]
        resumed = len(jobs) - len(pending)
        bar = tqdm(total=len(jobs), initial=resumed, desc="scaling", unit="config", disable=not progress)

        def finished(job: Job, row: dict) -> None:
            store_result(out_dir, job, row)
            rows[job.config.label] = row
            shown = f"{row['metric']:.4g}" if row["status"] == "ok" else "skipped"
            bar.set_postfix_str(f"{job.config.label} {shown}")
            bar.update()

        reference = _stored_reference(rows)
        # the first measured configuration runs here, in every mode, and measures the input model's reference
        # metrics that all the others are handed (once per sweep instead of once per configuration)
        while pending and reference is None:
            job = pending.pop(0)
            row = measure_job(job)
            finished(job, row)
            reference = row.get("reference_metrics")
        pending = [dataclasses.replace(job, reference_metrics=reference) for job in pending]
        if pending and parallel:
            from compressor.scaling_ray import run_on_ray

            run_on_ray(pending, workers, ray_address, finished, measure_job)
        else:
            for job in pending:
                finished(job, measure_job(job))
        bar.close()
        runs = [rows[job.config.label] for job in jobs]
        result = summarize(runs, grid, settings, identity, reference)
        result["timing"] = {"seconds": time.perf_counter() - started, "workers": workers,
                            "ray_address": ray_address, "measured": len(jobs) - resumed, "resumed": resumed,
                            "cpu_count": os.cpu_count(),
                            # over every row, reused ones included: what the whole grid cost when measured
                            "sum_run_seconds": sum(r.get("seconds", 0.0) for r in runs),
                            "sum_run_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in runs)}
        write_outputs(out_dir, result)
    log(f"wrote {out_dir / 'scaling.json'}, {out_dir / 'scaling.md'}")
    return result


def _check_outputs(out_dir: Path, configs: list[SweepConfig]) -> None:
    """A folder where the sweep writes a file (a result, scaling.json, a plot), or a file where it makes the runs
    folder, refused before any configuration is measured (it would fail after)."""
    from compressor.scaling_report import PLOTS

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    runs = out_dir / "runs"
    if os.path.lexists(runs) and not runs.is_dir():
        raise UserError(f"{runs} is not a folder: the sweep keeps its runs there (move it away)")
    for path in [out_dir / name for name in ("scaling.json", "scaling.md", *PLOTS)] + [
            _result_path(out_dir, config.label) for config in configs]:
        if path.is_dir():
            raise UserError(f"{path} is a folder: the sweep writes a file of that name (move it away)")


def _stored_reference(rows: dict) -> dict | None:
    return next((r["reference_metrics"] for r in rows.values() if r and r.get("status") == "ok"), None)


def summarize(runs: list[dict], grid: Grid, settings: Settings, identity: dict, reference: dict | None) -> dict:
    measured = [r for r in runs if r["status"] == "ok"]
    higher = measured[0]["higher_is_better"] if measured else False
    metric = measured[0]["metric_name"] if measured else None
    return {"schema_version": SCHEMA_VERSION, "checkpoint": identity["path"], "input_kind": identity["kind"],
            "params": measured[0]["params"] if measured else None,
            "grid": {"dtypes": list(grid.dtypes), "bits": list(grid.bits),
                     "block_sizes": [block_name(b) for b in grid.block_sizes], "budgets": list(grid.budgets)},
            "settings": dataclasses.asdict(settings), "metric": metric, "higher_is_better": higher,
            "measured_by": measured[0]["measured_by"] if measured else None,
            "reference": None if reference is None or metric is None else reference[metric],
            "compressor": __version__, "runs": runs,
            "pareto": [{k: r[k] for k in SUMMARY_KEYS} for r in pareto_front(runs, higher)],
            "best_per_budget": best_per_budget(runs, grid.budgets, grid.bits, higher)}

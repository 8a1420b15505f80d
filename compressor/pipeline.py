"""`compress run`: load a checkpoint, apply the recipe's passes, export to ONNX, validate, write the report."""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from compressor import __version__
from compressor.checkpoint import load_checkpoint
from compressor.errors import UserError
from compressor.report import SCHEMA_VERSION, environment, tool_record, write_reports
from compressor.tasks import TASKS
from compressor.validate import BenchmarkSettings, Tolerances, validate
from exporters.onnx_export import export_onnx
from samples.registry import SAMPLES, SHIPPED_DIR, count_params

ARTIFACT_NAME = "model.onnx"


@dataclass(frozen=True)
class RunOptions:
    recipe: str = "fp32"
    providers: tuple[str, ...] = ("cpu",)
    eval_limit: int | None = None  # None: the whole held-out split
    force: bool = False
    bench: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    progress: bool = True


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if (out_dir / ARTIFACT_NAME).exists() and not force:
        raise UserError(f"{out_dir / ARTIFACT_NAME} already exists (pass --force to overwrite)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir}: {exc.strerror or exc}") from None


def resolve_checkpoint(source: Path) -> Path:
    """A path as given, or the name of a shipped sample (e.g. `gpt-s`) when no such path exists."""
    if not source.exists() and str(source) in SAMPLES and (SHIPPED_DIR / str(source)).is_dir():
        return SHIPPED_DIR / str(source)
    return source


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(checkpoint_path: Path, out_dir: Path, options: RunOptions = RunOptions(), log=print) -> dict:
    if options.recipe != "fp32":
        raise UserError(f"unknown recipe {options.recipe!r} (available: fp32)")
    checkpoint_path = resolve_checkpoint(Path(checkpoint_path))
    checkpoint = load_checkpoint(checkpoint_path)
    prepare_out_dir(out_dir, options.force)
    task = TASKS[checkpoint.family]
    model = checkpoint.model
    recipe = {"name": options.recipe, "passes": []}
    log(f"loaded {checkpoint.name} ({checkpoint.family}, {count_params(model):,} params) from {checkpoint_path}")

    heldout = task.heldout_data(checkpoint.config, options.eval_limit)
    artifact = out_dir / ARTIFACT_NAME
    metadata = {
        "compressor.version": __version__,
        "compressor.source": checkpoint.name,
        "compressor.source_sha256": checkpoint.weights_sha256,
        "compressor.recipe": json.dumps(recipe, sort_keys=True),
        "compressor.family": checkpoint.family,
    }
    log(f"exporting to {artifact}")
    proto = export_onnx(model, task.parity_inputs(heldout), task.dynamic_axes(checkpoint.config),
                        task.OUTPUT_NAME, artifact, metadata)
    log(f"validating on {len(heldout)} held-out examples with ONNX Runtime ({', '.join(options.providers)})")
    results = validate(model, task, checkpoint.config, artifact, heldout, list(options.providers),
                       Tolerances(), options.bench, progress=options.progress)
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_record(),
        "model": {"name": checkpoint.name, "family": checkpoint.family, "params": count_params(model),
                  "source": str(checkpoint_path), "source_sha256": checkpoint.weights_sha256,
                  "config": checkpoint.config},
        "recipe": recipe,
        "artifact": {"path": str(artifact), "bytes": artifact.stat().st_size, "sha256": sha256_file(artifact),
                     "opset": max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")),
                     "ir_version": proto.ir_version},
        **results,
        "environment": environment(),
    }
    write_reports(out_dir, report)
    return report

"""The out folder: checked before any work, locked for the whole run, written into a staging folder whose
files (artifact, report, plots, recipe) are moved in together at the end; the report assembled."""
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path


from compressor.errors import UserError
from compressor.gates import evaluate_gates
from compressor.onnx_file import data_path, file_record
from compressor.ort_runtime import headline_provider
from compressor.plots import PLOTS
from compressor.report import SCHEMA_VERSION, environment, tool_record
from exporters.genai_config import GENAI_CONFIG, TOKENIZER_FILES
from passes.registry import GRAPH, PASSES

ARTIFACT_NAME = "model.onnx"
LOCK_NAME = ".compress.lock"
STAGE_PREFIX = ".stage-"
PAUSE_ENV = "COMPRESSOR_PAUSE_AT"  # a test hook: see pause_point
# what a run writes; the artifact moves in last, so its presence means the rest is there too
OUTPUTS = ("recipe.yaml", *PLOTS, "report.md", "report.json", GENAI_CONFIG, *TOKENIZER_FILES,
           data_path(Path(ARTIFACT_NAME)).name, ARTIFACT_NAME)


def check_out_dir(out_dir: Path, force: bool) -> None:
    """What can be said of --out without touching it: run first, before minutes of loading."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if (out_dir / ARTIFACT_NAME).exists() and not force:
        raise UserError(f"{out_dir / ARTIFACT_NAME} already exists (pass --force to overwrite)")
    for name in OUTPUTS:
        if (out_dir / name).is_dir():
            raise UserError(f"{out_dir / name} is a folder: the run writes a file of that name (move it away)")


@contextmanager
def locked_out_dir(out_dir: Path):
    """Hold --out for the whole run: a second run into it is refused, naming the holder. A folder this run
    created is removed again if the run fails before writing anything into it."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = _open_lock(out_dir / LOCK_NAME)
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir}: {exc.strerror or exc}") from None
    failed = True
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()[:20] or "unknown"
            raise UserError(f"--out {out_dir} is in use by another compress run (pid {holder}): wait for it or "
                            f"choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
        failed = False
    finally:
        if failed and created and {p.name for p in out_dir.iterdir()} <= {LOCK_NAME}:
            (out_dir / LOCK_NAME).unlink(missing_ok=True)
            out_dir.rmdir()
        handle.close()


def _open_lock(lock: Path):
    """The lock file, opened without following a link (a symlink planted at its name would have its target
    truncated and written) and only if it is a plain file of its own (not a FIFO, a device or a hard link)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UserError(f"{lock} is a symbolic link: a run writes its pid there and would write through the "
                            f"link (remove it)") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        kind = "another name (hard link) of a file" if stat.S_ISREG(info.st_mode) else "not a plain file"
        raise UserError(f"{lock} is {kind}: a run writes its pid there (remove it)")
    return os.fdopen(fd, "r+", encoding="utf-8")


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Called with the folder locked: clears what killed runs left (SIGKILL skips cleanup)."""
    check_out_dir(out_dir, force)
    try:
        for stale in out_dir.glob(".*.partial"):
            stale.unlink()
        for stale in out_dir.glob(f"{STAGE_PREFIX}*"):
            if stale.is_symlink() or not stale.is_dir():  # a link is removed, never followed
                stale.unlink()
            else:
                shutil.rmtree(stale)
        probe = out_dir / ".write-test"
        probe.unlink(missing_ok=True)  # whatever is there (a link too) goes; the probe itself is new
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir}: {exc.strerror or exc}") from None


@contextmanager
def staged(out_dir: Path):
    """A staging folder inside --out for the run's files; on success they replace the folder's earlier outputs
    (the artifact last), on failure the staging folder goes and the earlier outputs stay as they were."""
    stage = out_dir / f"{STAGE_PREFIX}{os.getpid()}"
    with real_names(out_dir, stage):
        stage.mkdir()
        try:
            yield stage
            pause_point("commit")
            _commit(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[^.]+\.partial")  # compressor.atomic's temp files: .NAME.<random>.partial
# a file that cannot be written for want of room or of a writable disk; the error names no file
WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def final_path(path, out_dir: Path, stage: Path | None = None) -> Path:
    """The file a user knows for a temp or staged one: STAGE/.NAME.x.partial and STAGE/NAME are OUT/NAME, the
    staging folder itself (and its .previous) is OUT."""
    path = Path(path)
    match = TEMP_NAME.fullmatch(path.name)
    if match:
        path = path.with_name(match["name"])
    if stage is not None and stage in (path, *path.parents):
        inside = path.relative_to(stage).parts
        inside = inside[1:] if inside[:1] == (".previous",) else inside
        return out_dir.joinpath(*inside[-1:])
    return path


@contextmanager
def real_names(out_dir: Path, stage: Path | None = None):
    """An OSError while writing the outputs as one line naming the file the user knows (never a temp or staged
    name), or --out itself where the error names no file (a full disk mid-write)."""
    try:
        yield
    except OSError as exc:
        named = next((Path(os.fsdecode(f)) for f in (exc.filename, exc.filename2) if isinstance(f, (str, bytes))),
                     None)
        if named is not None and (named.parent == out_dir or TEMP_NAME.fullmatch(named.name)
                                  or (stage is not None and stage in (named, *named.parents))):
            where = final_path(named, out_dir, stage)
        elif named is None and exc.errno in WRITE_ERRORS:
            where = f"the outputs into --out {out_dir}"
        else:
            raise
        raise CannotWrite(f"cannot write {where}: {exc.strerror or exc}") from None


class CannotWrite(UserError):
    """The environment refused a write (a full disk, a folder at a file's name): not the run's configuration, so a
    sweep stops on it instead of recording the configuration as skipped."""


def pause_point(phase: str) -> None:
    """A test hook, off unless COMPRESSOR_PAUSE_AT names this phase: the run prints `paused at PHASE` on stderr
    and waits there until a signal ends it (SIGINT, SIGTERM, SIGKILL) or SIGUSR1 lets it go on. Interrupt tests
    signal a run that cannot finish before the signal lands. Phases: `commit` (the run's files are all staged,
    none moved into --out yet)."""
    if os.environ.get(PAUSE_ENV) != phase:
        return
    resumed = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: resumed.append(signum))
    try:
        print(f"paused at {phase} ({PAUSE_ENV}; SIGUSR1 resumes)", file=sys.stderr, flush=True)
        while not resumed:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _commit(stage: Path, out_dir: Path) -> None:
    """Move the staged files into --out, all or none. The earlier outputs are moved aside first (the artifact
    first: at no moment does an earlier artifact sit beside this run's report), even those this run does not
    write (a plot must not stay from an earlier run); then this run's files move in, the artifact last, so that
    its presence means the rest is there too. Should a move fail (or the run be interrupted), what moved in goes
    back out and the earlier outputs back in. Renames within one folder: no copying, no space needed."""
    staged_names = sorted(p.name for p in stage.iterdir() if p.name != ARTIFACT_NAME)
    replaced = list(dict.fromkeys((ARTIFACT_NAME, *OUTPUTS, *staged_names)))
    for name in replaced:  # a folder made there during the run: refused before anything moves (never deleted)
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
            raise UserError(f"{out_dir / name} is a folder: the run writes a file of that name (move it away)")
    aside = stage / ".previous"
    aside.mkdir()
    moved_aside, moved_in = [], []
    try:
        for name in replaced:
            if os.path.lexists(out_dir / name):
                os.replace(out_dir / name, aside / name)
                moved_aside.append(name)
        for name in (*staged_names, ARTIFACT_NAME):
            os.replace(stage / name, out_dir / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            with suppress(OSError):
                os.replace(out_dir / name, stage / name)
        for name in moved_aside:
            with suppress(OSError):
                os.replace(aside / name, out_dir / name)
        raise


def summarize(report: dict, input_bits: dict) -> dict:
    """How much was gained: the input model's total model bits and fp32 parameter bytes over the artifact's, and
    the artifact's ONNX Runtime metric against the input model's (relative; positive = better, negative = worse)."""
    accuracy = report["accuracy"]
    provider = headline_provider(accuracy["onnxruntime"])
    measured, reference = accuracy["onnxruntime"][provider], accuracy["reference"]
    change = (measured - reference) / abs(reference) if reference else 0.0
    improvement = change if accuracy["higher_is_better"] else -change
    summary = {"bits_ratio": input_bits["total_model_bits"] / report["total_model_bits"],
               "bytes_ratio": input_bits["params"] * 4 / report["artifact"]["bytes"],
               "metric_change": improvement, "metric": accuracy["metric"], "measured_by": f"onnxruntime-{provider}",
               "verdict": "unchanged" if abs(improvement) < 1e-6 else "better" if improvement > 0 else "worse"}
    speedup = {p: g["speedup"] for p, g in report.get("generation", {}).items() if "speedup" in g}
    if speedup:  # decoders: generation speed against the input model's fp32 export (compressor.validate)
        summary["speedup"] = speedup
    return summary


def assemble_report(model_record: dict, recipe, artifact: Path, final_path: Path, graph_facts: dict, lowering,
                    bits: dict, input_bits: dict, pass_records: list, reference_metrics: dict, results: dict,
                    baseline_latency: dict | None) -> dict:
    """report.json's content (docs/report-schema.md), gates evaluated; `artifact` is the staged file that
    will be moved to `final_path`."""
    accuracy_report = results.pop("accuracy")
    metric = accuracy_report.pop("metric")
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_record(),
        "summary": None,
        "model": model_record,
        "recipe": recipe.to_dict(),
        "artifact": {"path": str(final_path), **file_record(artifact),
                     **graph_facts, "lowering": lowering},
        "total_model_bits": bits["total_model_bits"],
        "bits_per_param": bits["bits_per_param"],
        "passes": pass_records,
        "accuracy": {"metric": metric, "reference": reference_metrics[metric],
                     "reference_metrics": reference_metrics, **accuracy_report},
        **results,
        "baseline_latency": baseline_latency,
        "environment": environment(),
    }
    _fill_graph_pass_metrics(report)
    report["summary"] = summarize(report, input_bits)
    report["gates"] = evaluate_gates(recipe.gates, report, baseline_latency)
    return report


def _fill_graph_pass_metrics(report: dict) -> None:
    """Graph passes have no torch model to score: their entry takes the artifact's ONNX Runtime metric."""
    accuracy = report["accuracy"]
    measured = next(iter(accuracy["onnxruntime"].values()), None)
    for entry in report["passes"]:
        if PASSES[entry["name"]].rewrites == GRAPH and measured is not None:
            entry[accuracy["metric"]] = measured
            entry["measured_by"] = "onnxruntime-" + next(iter(accuracy["onnxruntime"]))

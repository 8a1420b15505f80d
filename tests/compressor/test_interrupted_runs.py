"""Runs killed part-way (SIGKILL, SIGINT, SIGTERM) leave no half-written model.onnx and no stray child, and the
same command again succeeds; two runs into one folder: one succeeds, the other is refused in one line.

The watched runs pause before their files move into --out (COMPRESSOR_PAUSE_AT=commit, compressor.artifact's
test hook), so a signal always lands on a run that could not have finished without it."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest

from conftest import COMPRESS, ENV, NO_BENCH

# --- runs killed part-way ------------------------------------------------------------------------------------

KILLED_RUN = ["run", "gpt-xs", "--recipe", "int4"]
PAUSED = "paused at commit"  # what the run prints once it waits at the hook


def _default_sigint() -> None:
    """A run as a terminal starts it: Ctrl-C's default action. A process started from one that ignores SIGINT (an
    xdist worker, a background shell job) inherits SIG_IGN, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Watched:
    """A `compress run` whose stderr lines are collected as they come, so the test can act on its progress. It
    waits at the commit pause (see the module docstring) until signalled; SIGUSR1 lets it finish."""

    def __init__(self, out: Path, args: tuple[str, ...] = NO_BENCH):
        self.process = subprocess.Popen([*COMPRESS, *KILLED_RUN, *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True,
                                        env={**ENV, "COMPRESSOR_PAUSE_AT": "commit"},
                                        preexec_fn=_default_sigint)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, needle: str) -> bool:
        return any(needle in line for line in self.lines)

    def wait_for(self, needle: str, timeout: float = 300) -> None:  # a loaded machine is slow
        deadline = time.monotonic() + timeout
        while not self.saw(needle):
            assert self.process.poll() is None, f"ended before {needle!r}: {self.lines}"
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout} s: {self.lines}"
            time.sleep(0.01)

    def finish(self) -> int:
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


def _assert_no_half_written_artifact(out: Path) -> None:
    artifact = out / "model.onnx"
    if artifact.exists():  # only ever complete: it appears by rename
        onnx.checker.check_model(onnx.load(str(artifact)))


def _killed_inside_an_atomic_write(out: Path) -> None:
    """A writer SIGKILLed after writing half a model.onnx into its temp file: what `kill -9` mid-save leaves."""
    code = ("import os, signal, sys; from pathlib import Path; from compressor.atomic import atomic_path\n"
            "with atomic_path(Path(sys.argv[1]) / 'model.onnx') as tmp:\n"
            "    tmp.write_bytes(b'half a model'); os.kill(os.getpid(), signal.SIGKILL)\n")
    process = subprocess.run([sys.executable, "-c", code, str(out)], env=ENV, timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.onnx").exists() and len(list(out.glob(".model.onnx.*.partial"))) == 1


def test_sigkill_leaves_no_half_written_artifact_and_a_rerun_succeeds(tmp_path, compress_here):
    # killed during export (the pause holds it before the commit, should export end within the half second)
    mid_export = tmp_path / "mid-export"
    run = _Watched(mid_export)
    run.wait_for("exporting to")
    time.sleep(0.5)  # torch.export + QDQ lowering take seconds; the artifact is written at their end
    run.process.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert not (mid_export / "model.onnx").exists()

    # killed as soon as the artifact's temp file shows (or, if its write is too quick to see, once it is done)
    at_write = tmp_path / "at-write"
    run = _Watched(at_write)
    run.wait_for("exporting to")
    while not list(at_write.glob(".*/.model.onnx.*.partial")) and not run.saw("validating"):
        assert run.process.poll() is None, run.lines
        time.sleep(0.0005)
    run.process.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    _assert_no_half_written_artifact(at_write)

    # the same command again, over the first run's folder plus a temp file a killed writer left, succeeds
    _killed_inside_an_atomic_write(mid_export)
    rerun = compress_here(*KILLED_RUN, *NO_BENCH, "--out", str(mid_export))
    assert rerun.returncode == 0, rerun.stderr
    assert not list(mid_export.glob(".*.partial")) and not list(mid_export.glob(".stage-*"))
    onnx.checker.check_model(onnx.load(str(mid_export / "model.onnx")))


def test_sigint_is_one_line_exit_2_and_no_artifact(tmp_path):
    run = _Watched(tmp_path / "out")
    run.wait_for(PAUSED)  # everything staged: without the signal the next step moves the artifact in
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 2
    assert not any("Traceback" in line for line in run.lines), run.lines
    errors = [line for line in run.lines if line.startswith("error:")]
    assert errors == [run.lines[-1]] and "interrupted" in errors[0], run.lines
    assert not (tmp_path / "out" / "model.onnx").exists() and not list((tmp_path / "out").glob(".*.partial"))


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat from its third field on (state, parent, ...; the start time is index 19), [] when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()
    except (OSError, IndexError):
        return []


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, each with its start time (a later process may reuse the number)."""
    return {int(entry.name): fields[19] for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and (fields := _stat(entry.name)) and fields[1] == str(pid)}


def _running(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[19] == started and fields[0] not in "ZX"  # a zombie has ended


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])  # same path
def test_sigterm_during_the_benchmark_cleans_up_and_a_rerun_succeeds(tmp_path, signum, compress_here):
    out = tmp_path / "out"
    # with the benchmark, whose child process is what this test is about: far more timed runs than it gets through
    # before the signal (and the seconds the test waits for it to end), so only the run's cleanup can end it
    run = _Watched(out, ("--eval-limit", "8", "--bench-runs", "100000", "--quiet"))
    run.wait_for("validating")
    deadline = time.monotonic() + 300
    while not (children := _children(run.process.pid)):  # the benchmark's child process has started
        assert run.process.poll() is None and time.monotonic() < deadline, run.lines
        time.sleep(0.01)
    run.process.send_signal(signum)
    assert run.finish() == 2
    errors = [line for line in run.lines if line.startswith("error:")]
    assert errors == [run.lines[-1]] and "interrupted" in errors[0], run.lines
    assert not any("Traceback" in line for line in run.lines)
    deadline = time.monotonic() + 30  # killed, a child still takes a moment to go on a loaded machine
    while (alive := [pid for pid, time_started in children.items() if _running(pid, time_started)]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, "the benchmark child outlived the run"
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # the run created it: nothing of it stays
    rerun = compress_here(*KILLED_RUN, *NO_BENCH, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr


def test_two_runs_into_one_folder_one_succeeds_the_other_is_refused(tmp_path, compress_here):
    out = tmp_path / "out"
    first = _Watched(out)
    first.wait_for(PAUSED)  # holding the folder, its files staged
    second = compress_here(*KILLED_RUN, *NO_BENCH, "--out", str(out))
    assert second.returncode == 2, second.stderr
    line, = second.stderr.strip().splitlines()
    assert f"pid {first.process.pid}" in line and "in use by another compress run" in line
    first.process.send_signal(signal.SIGUSR1)  # let the first one finish
    assert first.finish() == 0, first.lines
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"]["path"] == str(out / "model.onnx") and report["run"]["seed"] == 0
    assert "--seed 0" in (out / "recipe.yaml").read_text()
    assert not list(out.glob(".stage-*"))

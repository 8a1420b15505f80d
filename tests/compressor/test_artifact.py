"""compressor.artifact's out folder, directly: `staged` commits a run's files together, the artifact last, and a
failure at any point (while staging, or part-way through the commit itself) leaves the folder as it was: nothing
new in a fresh one, the earlier outputs untouched in a used one."""
import os
from pathlib import Path

import pytest

from compressor import artifact
from compressor.artifact import ARTIFACT_NAME, LOCK_NAME, OUTPUTS, locked_out_dir, staged
from compressor.errors import UserError

NEW = {"recipe.yaml": b"new recipe", "report.json": b"{\"new\": 1}", "report.md": b"# new", ARTIFACT_NAME: b"new onnx"}
PLOT = next(name for name in OUTPUTS if name.endswith(".png"))
EARLIER = {ARTIFACT_NAME: b"earlier onnx", "report.json": b"{\"earlier\": 1}", PLOT: b"earlier plot"}
MTIME_NS = 1_500_000_000_123_456_789


def _earlier_run(out: Path) -> None:
    """An earlier run's outputs (one plot this run does not write) and a file of the user's own."""
    out.mkdir(exist_ok=True)
    for name, content in {**EARLIER, "notes.txt": b"mine"}.items():
        (out / name).write_bytes(content)
        os.utime(out / name, ns=(MTIME_NS, MTIME_NS))


def _assert_earlier_run_intact(out: Path, staging: bool = False) -> None:
    names = [p.name for p in out.iterdir() if not (staging and p.name.startswith(artifact.STAGE_PREFIX))]
    assert sorted(names) == sorted([*EARLIER, "notes.txt"])
    for name, content in {**EARLIER, "notes.txt": b"mine"}.items():
        assert (out / name).read_bytes() == content and (out / name).stat().st_mtime_ns == MTIME_NS, name


def _stage_files(stage: Path) -> None:
    for name, content in NEW.items():
        (stage / name).write_bytes(content)


class _Moves:
    """os.replace, recorded: after each move into --out, which of this run's files are there, and whether an
    earlier artifact is; optionally failing (or interrupted) on the move of one file into --out."""

    def __init__(self, monkeypatch, out: Path, fail_on: str | None = None, error: BaseException | None = None):
        self.out, self.fail_on, self.error = out, fail_on, error or OSError(5, "Input/output error")
        self.into_out: list[str] = []
        self.snapshots: list[tuple[set, bool]] = []
        self._replace = os.replace
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, source, target):
        source, target = Path(source), Path(target)
        if target.parent == self.out and source.parent.name.startswith(artifact.STAGE_PREFIX):
            if target.name == self.fail_on:
                raise self.error
            self._replace(source, target)
            self.into_out.append(target.name)
            present = {n for n in NEW if (self.out / n).is_file() and (self.out / n).read_bytes() == NEW[n]}
            earlier = (self.out / ARTIFACT_NAME).is_file() and (self.out / ARTIFACT_NAME).read_bytes() != NEW[
                ARTIFACT_NAME]
            self.snapshots.append((present, earlier))
            return None
        return self._replace(source, target)


def test_outputs_are_committed_together_artifact_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_run(out)
    moves = _Moves(monkeypatch, out)
    with staged(out) as stage:
        assert stage.parent == out and stage.name.startswith(artifact.STAGE_PREFIX)
        _stage_files(stage)
        _assert_earlier_run_intact(out, staging=True)  # nothing moves before the run's work is done
    assert moves.into_out[-1] == ARTIFACT_NAME and sorted(moves.into_out) == sorted(NEW)
    for present, earlier in moves.snapshots:
        assert not earlier, "an earlier artifact sat beside this run's files"
        assert ARTIFACT_NAME not in present or present == set(NEW), "the artifact came before the rest"
    assert {name: (out / name).read_bytes() for name in NEW} == NEW
    assert not (out / PLOT).exists(), "an earlier run's plot stayed beside this run's report"
    assert (out / "notes.txt").read_bytes() == b"mine"  # not an output: left alone
    assert sorted(p.name for p in out.iterdir()) == sorted([*NEW, "notes.txt"])  # no staging folder left


def test_a_failure_while_staging_leaves_a_fresh_folder_empty_and_a_used_one_as_it_was(tmp_path):
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    fresh.mkdir()
    _earlier_run(used)
    for out in (fresh, used):
        with pytest.raises(RuntimeError, match="validation failed"), staged(out) as stage:
            _stage_files(stage)
            raise RuntimeError("validation failed")
    assert list(fresh.iterdir()) == []
    _assert_earlier_run_intact(used)


@pytest.mark.parametrize("fail_on", ["recipe.yaml", "report.md", ARTIFACT_NAME])
@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()], ids=["oserror", "sigint"])
def test_a_failure_part_way_through_the_commit_is_rolled_back(tmp_path, monkeypatch, fail_on, error):
    """The first, a middle and the last move into --out fail (an I/O error, or Ctrl-C / SIGTERM, which the CLI
    raises as KeyboardInterrupt): what moved in goes back out, the earlier outputs come back."""
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    fresh.mkdir()
    _earlier_run(used)
    for out in (fresh, used):
        moves = _Moves(monkeypatch, out, fail_on=fail_on, error=error)
        with pytest.raises(type(error)), staged(out) as stage:
            _stage_files(stage)
        assert fail_on not in moves.into_out and (fail_on == "recipe.yaml") == (moves.into_out == [])
        monkeypatch.undo()
    assert list(fresh.iterdir()) == []
    _assert_earlier_run_intact(used)


def test_a_folder_made_at_an_output_name_during_the_run_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    _earlier_run(out)
    with pytest.raises(UserError, match="report.md is a folder"), staged(out) as stage:
        _stage_files(stage)
        (out / "report.md").mkdir()
        (out / "report.md" / "keep.txt").write_text("the user's")
    assert (out / "report.md" / "keep.txt").read_text() == "the user's"
    (out / "report.md" / "keep.txt").unlink()
    (out / "report.md").rmdir()
    _assert_earlier_run_intact(out)


def test_a_failed_run_into_a_folder_it_created_leaves_no_folder(tmp_path, monkeypatch):
    """locked_out_dir around staged, as the pipeline holds them: the folder the run made goes too."""
    out = tmp_path / "new" / "out"
    _Moves(monkeypatch, out, fail_on="report.md")
    with pytest.raises(OSError), locked_out_dir(out), staged(out) as stage:
        assert (out / LOCK_NAME).is_file()
        _stage_files(stage)
    assert not out.exists()

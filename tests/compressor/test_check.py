"""`compress check` and the pytest fixture, used here on a real artifact."""
import json

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.errors import UserError


@pytest.fixture(scope="module")
def int4_run(shared_run):
    """The int4 run test_cli reads too (no benchmark: check reads the accuracy alone)."""
    return shared_run("gpt-xs int4 B32").out


def test_artifact_holds_its_own_baseline(int4_run, compressed_accuracy):
    result = compressed_accuracy(int4_run / "model.onnx", baseline=int4_run / "report.json", tolerance=1e-6)
    assert result.measured == pytest.approx(result.baseline, rel=1e-9)  # same data, same session: same number


def test_check_flags_a_regression(int4_run, tmp_path):
    report = json.loads((int4_run / "report.json").read_text())
    report["accuracy"]["onnxruntime"]["cpu"] *= 0.9  # pretend the baseline was 10% better
    baseline = tmp_path / "better.json"
    baseline.write_text(json.dumps(report))
    result = CliRunner().invoke(main, ["check", str(int4_run / "model.onnx"), "--baseline", str(baseline)])
    assert result.exit_code == 1 and "REGRESSION" in result.output
    ok = CliRunner().invoke(main, ["check", str(int4_run / "model.onnx"), "--baseline",
                                   str(int4_run / "report.json")])
    assert ok.exit_code == 0 and ok.output.startswith("ok:")


def test_check_rejects_foreign_files(tmp_path, int4_run):
    from compressor.check import check_artifact

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        check_artifact(junk, int4_run / "report.json")
    with pytest.raises(UserError, match="not a compress report.json"):
        check_artifact(int4_run / "model.onnx", int4_run / "recipe.yaml")

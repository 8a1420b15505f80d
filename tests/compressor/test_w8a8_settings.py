"""Bad W8A8 settings fail before any model loads: one `error:` line naming the setting, exit 2, nothing written;
an ONNX input takes the one activation mode it can."""
import onnx
import pytest

BAD = {
    "percentile 0": (["--recipe", "w8a8", "--set", "quantize.activation_percentile=0"],
                     "quantize.activation_percentile must be in (0, 100]"),
    "percentile 101": (["--recipe", "w8a8", "--set", "quantize.activation_percentile=101"],
                       "quantize.activation_percentile must be in (0, 100]"),
    "unknown observer": (["--recipe", "w8a8", "--set", "quantize.activation_observer=histogram"],
                         "quantize.activation_observer must be one of minmax, percentile, mse, entropy"),
    "unknown mode": (["--recipe", "w8a8", "--set", "quantize.activations=always"],
                     "quantize.activations must be one of none, static, dynamic"),
    "int4 weights": (["--recipe", "int4", "--set", "quantize.activations=static"],
                     "needs int8 symmetric weights per channel or per tensor"),
    "smoothquant without activations": (["--recipe", "int8", "--set", "smoothquant.alpha=0.5"],
                                        "smoothquant needs quantize.activations"),
    "alpha out of range": (["--recipe", "w8a8", "--set", "smoothquant.alpha=1.5"],
                           "smoothquant.alpha must be in [0, 1]"),
    "alpha at its old place": (["--recipe", "w8a8", "--set", "quantize.smoothquant_alpha=1.5"],
                               "smoothquant.alpha must be in [0, 1]"),
    "4-bit table per row": (["--recipe", "int4", "--set", "quantize.embedding_block_size=0"],
                            "quantize.embedding_bits=4 needs an embedding_block_size"),
    "float16 export": (["--recipe", "w8a8", "--set", "export.dtype=float16"],
                       "quantize.activations needs export.dtype float32"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_activation_setting_is_one_line_exit_2(tmp_path, name, compress_here):
    args, message = BAD[name]
    out = tmp_path / "out"
    result = compress_here("run", "gpt-xs", "--out", str(out), *args, "--quiet")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not out.exists()


def test_onnx_input_takes_dynamic_activations_and_refuses_static(tmp_path, compress, compress_here, shared_run):
    """An ONNX input has no torch model to calibrate through: static W8A8 is refused before --out is touched;
    dynamic W8A8 needs no calibration and gives the same integer kernels as a checkpoint input."""
    fp32 = shared_run("gpt-xs fp32").out
    out = tmp_path / "out"
    done = compress_here("run", str(fp32 / "model.onnx"), "--recipe", "w8a8", "--out", str(out), "--quiet")
    assert done.returncode == 2 and "needs calibration through the torch model" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    done = compress("run", str(fp32 / "model.onnx"), "--recipe", "w8a8-dynamic", "--out", str(out),
                    "--eval-limit", "4", "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "(integer activations: reported, the accuracy agreement gates)" in done.stdout, done.stdout
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert "MatMul" not in ops and ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") > 0, ops

"""The compress CLI end to end on the smallest sample, and its one-line errors on bad input."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compressor.cli import main
REPORT_KEYS = [
    "model.name", "model.params", "artifact.path", "artifact.bytes", "artifact.sha256", "accuracy.metric",
    "accuracy.reference", "accuracy.onnxruntime.cpu", "parity.max_abs", "parity.max_rel",
    "latency.cpu.batch1.p50_ms", "latency.cpu.batch1.p90_ms", "latency.cpu.batch16.p50_ms",
    "latency.cpu.batch16.p90_ms", "memory.cpu.peak_rss_bytes",
]


def _get(report: dict, dotted: str):
    value = report
    for key in dotted.split("."):
        value = value[key]
    return value


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "sample"):
        assert command in result.output
    listing = CliRunner().invoke(main, ["sample", "list"])
    assert "seq2seq-reverse" in listing.output and "gpt-xs" in listing.output and "gpt-xl" in listing.output


@pytest.mark.parametrize("command", [["run"], ["check"], ["generate"], ["bench"], ["passes"], ["sample", "train"]])
def test_every_subcommand_help_exits_0(compress, compress_here, command):
    # one as the console script in a process (exit code and stderr as a user sees them), the rest in-process
    done = (compress if command == ["run"] else compress_here)(*command, "--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage: ") and done.stderr == "", done.stderr


def test_train_then_run_end_to_end(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    trained = CliRunner().invoke(main, ["sample", "train", "gpt-xs", "--out", str(ckpt), "--steps", "3", "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(main, ["run", str(ckpt), "--out", str(out), "--eval-limit", "8", "--bench-runs",
                                       "3", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS:
        _get(report, key)
    assert report["artifact"]["bytes"] == (out / "model.onnx").stat().st_size
    assert report["accuracy"]["agreement"]["cpu"]["passed"] and report["parity"]["passed"]
    assert report["latency"]["cpu"]["batch16"]["p50_ms"] > 0
    assert "| ONNX Runtime cpu |" in (out / "report.md").read_text()

    again = CliRunner().invoke(main, ["run", str(ckpt), "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_shipped_seq2seq_by_name(tmp_path):
    result = CliRunner().invoke(main, ["run", "seq2seq-reverse", "--out", str(tmp_path / "o"), "--eval-limit",
                                       "64", "--no-bench", "--quiet"])
    assert result.exit_code == 0, result.output
    accuracy = json.loads((tmp_path / "o" / "report.json").read_text())["accuracy"]
    assert accuracy["metric"] == "exact_match"
    assert accuracy["reference"] >= 0.95
    assert accuracy["onnxruntime"]["cpu"] == pytest.approx(accuracy["reference"], abs=0.005)


def test_int4_run_reports_bits_and_passes(shared_run):
    result = shared_run("gpt-xs int4 B32")  # test_check reads it too
    report = json.loads((result.out / "report.json").read_text())
    assert 4 < report["bits_per_param"] < 32
    assert report["total_model_bits"] == pytest.approx(report["bits_per_param"] * report["model"]["params"])
    assert [p["name"] for p in report["passes"]] == ["quantize"]
    assert report["passes"][0]["perplexity"] == report["accuracy"]["torch"]
    assert report["accuracy"]["reference"] < report["accuracy"]["torch"]  # 4-bit costs a little perplexity
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"] and report["parity"]["passed"]
    # the default int8-activation kernel is reported beside it; the exact-kernel figure is the gated one
    assert report["parity"]["by_provider"]["cpu"]["gated"] is False
    assert "(default kernel, not gated: cpu " in result.stdout, result.stdout
    gated = [report["parity"]["by_provider"][k]["max_rel"] for k in ("cpu_exact", "cpu_decode")]
    assert report["parity"]["max_rel"] == max(gated) < 1e-4  # the worst of the exact-kernel entries
    assert report["artifact"]["lowering"]["lowered"] and not report["artifact"]["lowering"]["left_fp32"]
    fp32_bytes = report["model"]["params"] * 4
    assert report["artifact"]["bytes"] < 0.5 * fp32_bytes


def test_no_bench_writes_the_whole_report_without_speed_figures(shared_run, compress_here, tmp_path):
    result = shared_run("gpt-xs int4 B32")
    report = json.loads((result.out / "report.json").read_text())
    assert report["latency"] == {} and "generation" not in report and "speedup" not in report["summary"]
    assert report["run"]["bench_runs"] is None and report["baseline_latency"] is None
    assert list(report["memory"]) == ["compress_peak_rss_mb"]  # no benchmark process to measure
    assert report["accuracy"]["agreement"]["cpu"]["passed"] and report["gates"]["passed"]
    assert report["plots"] == ["passes.png", "accuracy_vs_size.png"]  # no latency.png
    assert sorted(p.name for p in result.out.iterdir() if not p.name.startswith(".")) == [
        "accuracy_vs_size.png", "model.onnx", "passes.png", "recipe.yaml", "report.json", "report.md"]
    markdown = (result.out / "report.md").read_text()
    assert "| ONNX Runtime cpu |" in markdown and "## Generation" not in markdown
    assert "; latency not measured (--no-bench); artifact " in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("summary: ")
    # a speed gate needs the benchmark, and --bench-runs says to run it: each refused before any work
    for args, needle in ((("--set", "gates.min_speedup=1"), "gates.min_speedup needs the latency benchmark"),
                         (("--bench-runs", "3"), "--no-bench skips the benchmark that --bench-runs sets")):
        done = compress_here("run", "gpt-xs", "--recipe", "int4", "--no-bench", *args, "--out", str(tmp_path / "o"))
        assert done.returncode == 2 and needle in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert not (tmp_path / "o").exists()


def test_same_inputs_give_byte_identical_quantized_artifacts(tmp_path):
    digests = []
    for attempt in ("a", "b"):
        result = CliRunner().invoke(main, ["run", "gpt-xs", "--recipe", "int4-gptq", "--set",
                                           "quantize.block_size=32", "--out", str(tmp_path / attempt),
                                           "--eval-limit", "4", "--no-bench", "--quiet"])
        assert result.exit_code == 0, result.output
        digests.append(json.loads((tmp_path / attempt / "report.json").read_text())["artifact"]["sha256"])
    assert digests[0] == digests[1]


def test_stale_partial_files_are_cleared(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".model.onnx.abc.partial").write_bytes(b"half a model")
    result = CliRunner().invoke(main, ["run", "gpt-xs", "--out", str(out), "--eval-limit", "4", "--no-bench",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert not list(out.glob(".*.partial")) and (out / "model.onnx").exists()


def _assert_clean_failure(result: subprocess.CompletedProcess, out: Path, needle: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "model.onnx").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("case", ["corrupt", "pickle", "missing"])
def test_bad_checkpoints_fail_with_one_line(compress_here, tmp_path, shipped, case):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((shipped / "gpt-xs" / "config.json").read_text())
    if case == "corrupt":
        (ckpt / "model.safetensors").write_bytes((shipped / "gpt-xs" / "model.safetensors").read_bytes()[:5000])
        needle = "safetensors"
    elif case == "pickle":
        torch.save({"token_emb.weight": _Exploit()}, ckpt / "model.pt")
        needle = "weights_only"
    else:
        ckpt = tmp_path / "does-not-exist"
        needle = "not found"
    result = compress_here("run", str(ckpt), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _assert_clean_failure(result, tmp_path / "out", needle)
    assert not (tmp_path / "pwned").exists()


def test_parity_gates_the_exact_kernel_not_the_approximate_default():
    from compressor.validate import summarize_parity

    def entry(max_rel, tolerance, **extra):
        return {"max_abs": max_rel, "max_rel": max_rel, "tolerance_max_rel": tolerance,
                "passed": max_rel <= tolerance, **extra}

    approximate = entry(0.11, 0.06, gated=False)  # int8 activations on a model with outliers: not an export error
    summary = summarize_parity({"cpu": approximate, "cpu_exact": entry(5e-6, 1e-4)})
    assert summary["passed"] and summary["max_rel"] == 5e-6 and summary["tolerance_max_rel"] == 1e-4
    assert not summarize_parity({"cpu": approximate, "cpu_exact": entry(2e-3, 1e-4)})["passed"]
    assert not summarize_parity({"cpu": entry(2e-3, 1e-4)})["passed"]  # fp32 artifacts: the default is exact
    # W8A8: nothing is exact, nothing gated; the figures shown are the worst, the accuracy agreement gates
    w8a8 = summarize_parity({"cpu": entry(0.49, 0.15, gated=False), "cpu_decode": entry(0.52, 0.15, gated=False)})
    assert w8a8["passed"] and not w8a8["gated"] and w8a8["max_rel"] == 0.52


def test_an_unexpected_exception_is_a_one_line_bug_with_its_own_exit_code(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a key nobody expected")

    monkeypatch.setattr("compressor.api.compress", broken)  # what `compress run` calls
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    result = CliRunner().invoke(main, ["run", "gpt-xs", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 3, result.output
    line, = result.stderr.strip().splitlines()
    assert line.startswith("bug: unexpected KeyError") and "traceback saved to" in line
    log = Path(line.split("traceback saved to ", 1)[1].split(";", 1)[0])
    assert log.parent == tmp_path and "a key nobody expected" in log.read_text() and "Traceback" in log.read_text()


@pytest.mark.parametrize("args, needle", [
    (["--device", "bogus"], "is not a torch device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "mps"], "--device"),
    (["--seed", "-1"], "--seed"),
])
def test_sample_train_refuses_bad_options_in_one_line(compress_here, tmp_path, args, needle):
    done = compress_here("sample", "train", "gpt-xs", "--out", str(tmp_path / "ckpt"), *args)
    assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "ckpt").exists()


def test_a_stray_gguf_does_not_reroute_our_checkpoint(compress_here, shipped, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(shipped / "gpt-xs", folder)
    (folder / "notes.gguf").write_bytes(b"GGUF but not a model")
    done = compress_here("run", str(folder), "--out", str(tmp_path / "o"), "--eval-limit", "4", "--no-bench",
                         "--quiet")
    assert done.returncode == 0, done.stderr


def test_a_folder_named_like_an_output_is_refused_before_work(compress_here, tmp_path):
    (tmp_path / "o" / "report.json").mkdir(parents=True)
    done = compress_here("run", "gpt-xs", "--out", str(tmp_path / "o"), "--quiet")
    assert done.returncode == 2 and "report.json is a folder" in done.stderr, done.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.json"]


def test_a_config_far_larger_than_its_weights_is_refused_at_once(compress_here, shipped, tmp_path):
    import shutil
    import time

    folder = tmp_path / "ckpt"
    shutil.copytree(shipped / "gpt-xs", folder)
    record = json.loads((folder / "config.json").read_text())
    record["config"]["layers"] = 10**9
    (folder / "config.json").write_text(json.dumps(record))
    started = time.monotonic()
    done = compress_here("run", str(folder), "--out", str(tmp_path / "o"), "--quiet")
    assert done.returncode == 2 and "implies 49,984,000,041,088 parameters" in done.stderr, done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "o").exists()


def test_float8_weights_and_a_fifo_as_weights_file_are_refused(compress_here, shipped, tmp_path):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "f8"
    shutil.copytree(shipped / "gpt-xs", folder)
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(state, str(folder / "model.safetensors"))
    done = compress_here("run", str(folder), "--out", str(tmp_path / "o"), "--quiet")
    assert done.returncode == 2 and "is stored as float8_e4m3fn" in done.stderr, done.stderr
    fifo = folder / "weights.safetensors"
    os.mkfifo(fifo)
    done = compress_here("run", str(fifo), "--out", str(tmp_path / "o"), "--quiet")
    assert done.returncode == 2 and "is not a regular file" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()

"""Issue 25's Medium and Low cases that were still open, through the `compress` CLI as a user runs it (each class at
least once as a process, `compress`; the rest in-process, `compress_here`): a symlinked --out lock, a model whose
outputs are NaN, exponent-notation floats in recipes, generate / bench arguments, scaling grids and stored rows,
messages naming temp files, external-data locations, and artifacts whose bytes depended on where the input lay."""
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor import scaling
from compressor.artifact import LOCK_NAME, final_path, prepare_out_dir
from compressor.errors import UserError
from compressor.recipes import resolve_recipe
from compressor.scaling import Settings, SweepConfig, parse_grid
from exporters import metadata_keys
from samples.registry import SHIPPED_DIR

REPO = Path(__file__).parents[2]
NO_BENCH = ["--eval-limit", "4", "--no-bench", "--quiet"]


def _one_line(done) -> str:
    """Exit 2 and exactly one line on stderr, `error: ...` (a refusal before any work, so no log line either)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def _last_line_error(done) -> str:
    """Exit 2 after some work: the run's log lines, then exactly one `error:` line, the last one."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], done.stderr
    assert "Traceback" not in done.stderr and "bug:" not in done.stderr, done.stderr
    return lines[-1]


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ------------------------------------------------------------------------------------------ --out/.compress.lock

@pytest.mark.parametrize("target", ["a file", "no file (dangling)"])
def test_a_symlinked_lock_is_refused_and_its_target_left_alone(compress, tmp_path, target):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    if target == "a file":
        victim.write_text("precious\n")
    (out / LOCK_NAME).symlink_to(victim)
    line = _one_line(compress("run", "gpt-xs", "--out", str(out), *NO_BENCH))
    assert line == (f"error: {out / LOCK_NAME} is a symbolic link: a run writes its pid there and would write "
                    f"through the link (remove it)")
    # was: the target truncated and overwritten with the run's pid (or created, when the link dangled)
    assert (victim.read_text() == "precious\n") if target == "a file" else not victim.exists()
    assert [p.name for p in out.iterdir()] == [LOCK_NAME] and (out / LOCK_NAME).is_symlink()


def test_a_lock_that_is_a_fifo_or_a_hard_link_is_refused(compress_here, tmp_path):
    fifo_out, linked_out, victim = tmp_path / "fifo", tmp_path / "linked", tmp_path / "victim.txt"
    fifo_out.mkdir()
    os.mkfifo(fifo_out / LOCK_NAME)
    assert _one_line(compress_here("run", "gpt-xs", "--out", str(fifo_out), *NO_BENCH)) == (
        f"error: {fifo_out / LOCK_NAME} is not a plain file: a run writes its pid there (remove it)")
    linked_out.mkdir()
    victim.write_text("precious\n")
    os.link(victim, linked_out / LOCK_NAME)
    assert _one_line(compress_here("run", "gpt-xs", "--out", str(linked_out), *NO_BENCH)) == (
        f"error: {linked_out / LOCK_NAME} is another name (hard link) of a file: a run writes its pid there "
        f"(remove it)")
    assert victim.read_text() == "precious\n"


def test_links_left_in_out_are_removed_never_followed(tmp_path):
    out, victim, elsewhere = tmp_path / "out", tmp_path / "victim.txt", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    victim.write_text("precious\n")
    (out / ".write-test").symlink_to(victim)  # the writability probe's name
    (out / ".stage-999").symlink_to(elsewhere)  # a staging folder's name (a killed run's leftovers are cleared)
    prepare_out_dir(out, force=False)
    assert victim.read_text() == "precious\n" and (elsewhere / "keep.txt").read_text() == "mine"
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------ NaN / Inf outputs

def _overflowing_checkpoint(folder: Path) -> Path:
    """gpt-xs with a finite token table of 3e38: the first LayerNorm's sum overflows, every logit is NaN."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(SHIPPED_DIR / "gpt-xs", folder)
    tensors = {k: v.astype(np.float32) for k, v in load_file(folder / "model.safetensors").items()}
    tensors["token_emb.weight"][:] = 3e38
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_a_model_whose_outputs_are_nan_is_refused_before_export(compress, tmp_path):
    checkpoint = _overflowing_checkpoint(tmp_path / "overflow")
    out = tmp_path / "out"
    line = _last_line_error(compress("run", str(checkpoint), "--out", str(out), *NO_BENCH))
    # was: exported and reported (parity nan, perplexity nan), exit 1 with model.onnx written
    assert line == (f"error: {checkpoint}: the model's outputs on the held-out data hold NaN or Inf values (its "
                    f"forward pass overflows): nothing to compress")
    assert not out.exists()


def test_an_onnx_input_whose_outputs_are_nan_is_refused(compress_here, shared_run, tmp_path):
    model = onnx.load(str(shared_run("gpt-xs fp32").out / "model.onnx"))
    head = next(t for t in model.graph.initializer if t.name == "lm_head.weight")  # a finite 3e38 everywhere: the
    head.CopyFrom(numpy_helper.from_array(np.full((64, 256), 3e38, np.float32), head.name))  # logits are ±inf, NaN
    (tmp_path / "in").mkdir()
    onnx.save(model, str(tmp_path / "in" / "model.onnx"))
    line = _last_line_error(compress_here("run", str(tmp_path / "in" / "model.onnx"), "--out",
                                          str(tmp_path / "out"), "--recipe", "int8", *NO_BENCH))
    assert line == (f"error: {tmp_path / 'in' / 'model.onnx'}: the model's outputs hold NaN or Inf values (its "
                    f"forward pass overflows): nothing to compress")
    assert not (tmp_path / "out").exists()


def test_a_recipe_that_makes_the_outputs_nan_is_refused_before_export(compress_here, tmp_path):
    done = compress_here("run", "gpt-xs", "--out", str(tmp_path / "out"), "--set", "heal.steps=1", "--set",
                         "heal.learning_rate=1e30", *NO_BENCH)
    assert _last_line_error(done).endswith("gpt-xs: after heal the model's outputs hold NaN or Inf values: refused "
                                           "before export (change the recipe)")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ exponent-notation floats

def test_exponent_floats_are_read_as_numbers_in_set_and_recipe_files(tmp_path):
    recipe = resolve_recipe("fp32", ("heal.learning_rate=1e-3", "gates.min_recovery=9E-1", "prune.sparsity=2.5e-1"))
    passes = dict(recipe.passes)
    assert passes["heal"].learning_rate == 0.001 and passes["prune"].sparsity == 0.25
    assert recipe.gates.min_recovery == 0.9
    path = tmp_path / "r.yaml"  # YAML 1.1 reads 5E-5 and 9e-1 as text; 1.0e-3 it reads as a float
    path.write_text("passes:\n  - prune: {sparsity: 5e-1}\n  - heal: {learning_rate: 5E-5, steps: 1}\n"
                    "gates: {min_recovery: 9e-1}\n")
    recipe = resolve_recipe(str(path))
    assert dict(recipe.passes)["prune"].sparsity == 0.5 and dict(recipe.passes)["heal"].learning_rate == 5e-5
    assert recipe.gates.min_recovery == 0.9


@pytest.mark.parametrize("setting, message", [
    ("quantize.bits=4e0", "quantize.bits must be int, not '4e0'"),  # an int field takes no float text
    ("heal.learning_rate=1e-3x", "heal.learning_rate must be float, not '1e-3x'"),
    ("heal.learning_rate=1e400", "heal.learning_rate must be a positive number, not inf"),
    ("gates.min_recovery=-1e-3", "gates.min_recovery must be a positive number, not -0.001"),
])
def test_exponent_text_that_is_no_fit_is_still_refused(compress_here, tmp_path, setting, message):
    assert message in _one_line(compress_here("run", "gpt-xs", "--out", str(tmp_path / "o"), "--set", setting))


def test_exponent_floats_through_the_console_script(compress, compress_here, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    # the recipe is read first: --out, checked next, is what refuses the run (was: "must be float, not '1e-3'")
    line = _one_line(compress("run", "gpt-xs", "--out", str(not_a_folder), "--set", "heal.learning_rate=1e-3",
                              "--set", "gates.min_recovery=9e-1"))
    assert line == f"error: --out {not_a_folder} exists and is not a folder"
    done = compress_here("run", "gpt-xs", "--out", str(tmp_path / "out"), "--set", "prune.sparsity=2.5e-1",
                         *NO_BENCH)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recipe"]["passes"][0]["config"]["sparsity"] == 0.25


# ------------------------------------------------------------------------------------------ generate / bench

def test_a_prompt_that_is_not_utf8_is_one_line(shared_run):
    artifact = shared_run("gpt-xs fp32").out
    # bytes, as a shell hands a Latin-1 terminal's text over (was: UnicodeEncodeError, exit 3)
    done = subprocess.run([sys.executable, "-m", "compressor.cli", "generate", str(artifact), "--prompt",
                           b"caf\xe9 au lait"], capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr == b"error: --prompt is not UTF-8 text (the byte 0xe9 at character 4): give it as UTF-8\n"


def test_generate_prints_nothing_before_a_refusal(compress, shared_run):
    artifact = shared_run("gpt-xs fp32").out
    done = compress("generate", str(artifact), "--prompt", "a" * 300)
    assert _one_line(done) == ("error: the prompt has 300 tokens; this model takes at most 128 in all (the rows "
                               "of pos_emb.weight)")
    assert done.stdout == ""  # was: the prompt, then the error line
    done = compress("generate", str(artifact), "--prompt", "The ", "--max-new-tokens", "4")
    assert done.returncode == 0 and done.stdout.startswith("The ") and len(done.stdout) > len("The \n")


def test_bench_threads_are_bounded(compress_here, shared_run):
    line = _one_line(compress_here("bench", str(shared_run("gpt-xs fp32").out), "--threads", "100000"))
    # was: ONNX Runtime set out to start 100,000 threads (still running after a minute)
    assert line.startswith("error: Invalid value for '--threads': 100000 is not in the range 1<=x<=1024")


def test_files_beside_the_artifact_that_cannot_be_read(compress_here, shared_run, tmp_path):
    folder = tmp_path / "xs"
    shutil.copytree(shared_run("gpt-xs fp32").out, folder)
    (folder / "tokenizer.json").write_text('{"model": ')  # was: the tokenizers package's Exception, exit 3
    assert _one_line(compress_here("generate", str(folder), "--prompt", "hi")) == (
        f"error: {folder / 'tokenizer.json'}: not a tokenizer that can be read (EOF while parsing a value at line 1 "
        f"column 10)")
    (folder / "tokenizer.json").unlink()
    (folder / "genai_config.json").write_text("[" * 100_000)  # was: RecursionError, exit 3
    assert _one_line(compress_here("generate", str(folder), "--prompt", "hi")) == (
        f"error: {folder / 'genai_config.json'}: nested too deeply to be a genai_config.json")
    (folder / "genai_config.json").unlink()
    model = onnx.load(str(folder / "model.onnx"))
    for prop in model.metadata_props:  # read as no model config (generate takes its limits from the graph)
        if prop.key == metadata_keys.MODEL_CONFIG:
            prop.value = "[" * 100_000
    onnx.save(model, str(folder / "model.onnx"))
    done = compress_here("generate", str(folder), "--prompt", "The ", "--max-new-tokens", "2")
    assert done.returncode == 0 and done.stdout.startswith("The "), done.stderr


def test_special_token_ids_that_are_not_ids_are_left_out(tmp_path):
    from exporters.genai_config import _special_tokens

    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": [], "eos_token_id": 2, "bos_token_id": True}))
    assert _special_tokens(tmp_path) == {"eos_token_id": 2, "pad_token_id": 2}  # was: IndexError at export
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 6], "pad_token_id": "x"}))
    assert _special_tokens(tmp_path) == {"eos_token_id": [5, 6], "pad_token_id": 5}
    (tmp_path / "config.json").write_text("[1, 2]")
    assert _special_tokens(tmp_path) == {"pad_token_id": 0}


# ------------------------------------------------------------------------------------------ scaling

def _must_not_run(job):
    raise AssertionError(f"{job.config.label} was measured")


def test_unicode_digits_in_bits_through_the_console_script(compress, tmp_path):
    out = tmp_path / "out"
    # '²'.isdigit() is true and int('²') fails: was exit 3
    assert _one_line(compress("scaling", "gpt-xs", "--out", str(out), "--bits", "²")) == (
        "error: --bits: '²' is not an integer in 2..8")
    assert not out.exists()


@pytest.mark.parametrize("option, item, message", [
    ("--bits", "٣", "--bits: '٣' is not an integer in 2..8"),  # int('٣') is 3: was taken as k = 3
    ("--block-sizes", "６４", "--block-sizes: '６４' is not a power of two in 16..1024 or 'channel'"),
    ("--block-sizes", "0064" * 50, "is not a power of two"),
    ("--budget", "٤", "--budget: '٤' is not a number of bits per parameter in (0, 32]"),  # float('٤') is 4.0
    ("--budget", "1_0", "--budget: '1_0' is not a number"),
    ("--budget", "infinity", "--budget: 'infinity' is not a number"),
])
def test_only_ascii_numbers_make_a_grid(compress_here, monkeypatch, tmp_path, option, item, message):
    monkeypatch.setattr(scaling, "measure_job", _must_not_run)
    assert message in _one_line(compress_here("scaling", "gpt-xs", "--out", str(tmp_path / "o"), option, item))


def test_budgets_that_round_alike_keep_their_own_labels():
    grid = parse_grid("int", "4", "64", ("4.5,4.5000001,4.50000001",))
    labels = [c.label for c in grid.configs() if c.budget is not None]
    # was: budget-4.5 for all three, one result file and one out folder between them
    assert labels == ["budget-4.5", "budget-4.5000001", "budget-4.50000001"]
    assert SweepConfig(budget=5.0).label == "budget-5" and SweepConfig(budget=1e-05).label == "budget-1e-05"


def _fake_measure(calls):
    def measure(job):
        calls.append(job.config.label)
        config = job.config
        return {"label": config.label, "dtype": config.dtype, "bits": config.bits,
                "block_size": scaling.block_name(config.block_size), "budget_bits_per_param": None,
                "recipe": config.recipe, "overrides": list(config.overrides), "status": "ok",
                "total_model_bits": 100 * config.bits, "bits_per_param": config.bits + 0.5, "params": 100,
                "metric_name": "perplexity", "higher_is_better": False, "metric": 10.0 / config.bits,
                "measured_by": "onnxruntime-cpu", "metric_torch": 10.0 / config.bits,
                "reference_metrics": {"perplexity": 2.0}, "quantize_label": "x", "layers_quantized": 1,
                "layers_skipped": 0, "seconds": 1.0, "cpu_seconds": 1.0}
    return measure


@pytest.mark.parametrize("edit", [
    lambda row: row.pop("metric"), lambda row: row.update(metric="4.2"), lambda row: row.update(params=True),
    lambda row: row.update(label="int3-B64"), lambda row: row.update(bits=3), lambda row: row.update(status="done"),
    lambda row: row.update(reference_metrics={"exact_match": 1.0}), lambda row: row.update(seconds="1 s"),
    lambda row: row.update(layers_skipped=None), lambda row: row.update(status="skipped"),
    lambda row: row.clear(),
], ids=["no-metric", "metric-text", "params-bool", "another-label", "another-k", "unknown-status",
        "reference-of-another-metric", "seconds-text", "layers-skipped-null", "skipped-without-reason", "empty"])
def test_a_stored_row_that_does_not_hold_what_the_sweep_reads_is_measured_again(tmp_path, monkeypatch, edit):
    calls = []
    monkeypatch.setattr(scaling, "measure_job", _fake_measure(calls))
    grid = parse_grid("int", "4", "64")
    first = scaling.sweep("gpt-xs", tmp_path, grid, Settings(eval_limit=4), progress=False, log=lambda _: None)
    again = scaling.sweep("gpt-xs", tmp_path, grid, Settings(eval_limit=4), progress=False, log=lambda _: None)
    assert calls == ["int4-B64"] and again["timing"]["resumed"] == 1  # an intact row is reused
    path = tmp_path / "runs" / "int4-B64.json"
    stored = json.loads(path.read_text())
    edit(stored["row"])
    path.write_text(json.dumps(stored))  # its fingerprint still matches
    calls.clear()
    result = scaling.sweep("gpt-xs", tmp_path, grid, Settings(eval_limit=4), progress=False, log=lambda _: None)
    assert calls == ["int4-B64"] and result["runs"] == first["runs"]


def test_a_stored_row_without_its_metric_through_the_console_script(compress, compress_here, tmp_path):
    args = ("scaling", "gpt-xs", "--out", str(tmp_path), "--dtypes", "int", "--bits", "4", "--block-sizes", "64",
            "--eval-limit", "4", "--quiet")
    assert compress_here(*args).returncode == 0
    path = tmp_path / "runs" / "int4-B64.json"
    stored = json.loads(path.read_text())
    metric = stored["row"].pop("metric")
    path.write_text(json.dumps(stored))
    done = compress(*args)  # was: KeyError 'metric', exit 3
    assert done.returncode == 0 and done.stderr.strip().splitlines()[-1].startswith("wrote "), done.stderr
    assert json.loads((tmp_path / "scaling.json").read_text())["runs"][0]["metric"] == metric


# ------------------------------------------------------------------------------------------ temp names in messages

def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_mid_run_names_out_not_a_temp_file(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "compressor.cli", "run", "gpt-xs", "--out", str(out), *NO_BENCH],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          preexec_fn=_file_size_limit(100_000))  # the fp32 artifact is 0.6 MB
    assert _last_line_error(done) == f"error: cannot write the outputs into --out {out}: File too large"
    assert not out.exists()  # the folder this run made is gone again


def test_a_result_file_that_is_a_folder_is_refused_before_any_run(compress_here, monkeypatch, tmp_path):
    monkeypatch.setattr(scaling, "measure_job", _must_not_run)
    (tmp_path / "runs" / "int4-B64.json").mkdir(parents=True)
    line = _one_line(compress_here("scaling", "gpt-xs", "--out", str(tmp_path), "--dtypes", "int", "--bits", "4",
                                   "--block-sizes", "64"))
    # was: the configuration measured, then `error: <out>/runs/.int4-B64.json.kautnshc.partial: Is a directory`
    assert line == f"error: {tmp_path / 'runs' / 'int4-B64.json'} is a folder: the sweep writes a file of that name " \
                   f"(move it away)"


def test_a_result_file_made_a_folder_mid_sweep_is_named_as_the_result(tmp_path, monkeypatch):
    measure = _fake_measure([])

    def racing(job):  # another process makes a folder at the result's name while the configuration runs
        (tmp_path / "runs" / f"{job.config.label}.json").mkdir()
        return measure(job)

    monkeypatch.setattr(scaling, "measure_job", racing)
    with pytest.raises(UserError) as refused:
        scaling.sweep("gpt-xs", tmp_path, parse_grid("int", "4", "64"), progress=False, log=lambda _: None)
    assert str(refused.value) == f"cannot write {tmp_path / 'runs' / 'int4-B64.json'}: Is a directory"


def test_a_full_disk_mid_sweep_stops_it_and_records_nothing(tmp_path, monkeypatch):
    from compressor import pipeline

    def full(*args, **kwargs):  # the run's reports, written into its staging folder, meet a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline, "write_reports", full)
    with pytest.raises(UserError) as refused:
        scaling.sweep("gpt-xs", tmp_path, parse_grid("int", "4", "64"), Settings(eval_limit=4), progress=False,
                      log=lambda _: None)
    run = tmp_path / "runs" / "int4-B64"
    assert str(refused.value) == f"cannot write the outputs into --out {run}: No space left on device"
    # not a skipped configuration, stored and reused by the next sweep as if the recipe did not fit
    assert not (tmp_path / "runs" / "int4-B64.json").exists() and not run.exists()


def test_final_path_maps_temp_and_staged_names():
    out = Path("/o")
    stage = out / ".stage-12"
    assert final_path(stage / ".model.onnx.k2j4x9_a.partial", out, stage) == out / "model.onnx"
    assert final_path(stage / "report.json", out, stage) == out / "report.json"
    assert final_path(stage / ".previous" / "report.md", out, stage) == out / "report.md"
    assert final_path(stage, out, stage) == out
    assert final_path(out / "runs" / ".int4-B64.json.abcdefgh.partial", out) == out / "runs" / "int4-B64.json"


# ------------------------------------------------------------------------------------------ external data

def _external(source: Path, folder: Path, location: str) -> Path:
    """A copy of `source` whose largest initializer points to external data at `location` (made by the caller)."""
    model = onnx.load(str(source))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


def test_external_data_in_a_symlink_loop_through_the_console_script(compress, shared_run, tmp_path):
    model = _external(shared_run("gpt-xs fp32").out / "model.onnx", tmp_path / "m", "a.bin")
    (tmp_path / "m" / "a.bin").symlink_to("b.bin")
    (tmp_path / "m" / "b.bin").symlink_to("a.bin")
    line = _one_line(compress("run", str(model), "--out", str(tmp_path / "o"), "--recipe", "int4", *NO_BENCH))
    # was: RuntimeError: Symlink loop, exit 3
    assert line.startswith("error: tensor ") and line.endswith(
        ": external data location 'a.bin' is a loop of symbolic links: refused")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["nul", "fifo", "folder"])
def test_external_data_locations_that_name_no_file(compress_here, shared_run, tmp_path, case):
    location = {"nul": "w\0.bin", "fifo": "w.fifo", "folder": "sub"}[case]
    model = _external(shared_run("gpt-xs fp32").out / "model.onnx", tmp_path / "m", location)
    if case == "fifo":
        os.mkfifo(tmp_path / "m" / location)  # reading it would wait forever
    elif case == "folder":
        (tmp_path / "m" / location).mkdir()
    line = _one_line(compress_here("run", str(model), "--out", str(tmp_path / "o"), "--recipe", "int4"))
    ending = {"nul": "external data location 'w\\x00.bin' holds a NUL byte: refused",  # was: ValueError, exit 3
              "fifo": "external data location 'w.fifo' is not a file",
              "folder": "external data location 'sub' is not a file"}[case]
    assert line.startswith("error: tensor ") and line.endswith(ending), line
    done = compress_here("check", str(model), "--baseline", str(shared_run("gpt-xs fp32").out / "report.json"))
    assert _one_line(done).endswith(ending)  # `compress check` reads the same locations


# ------------------------------------------------------------------------------------------ location independence

@pytest.fixture(scope="module")
def hf_run(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama copied to a/tiny and run fp32 into out; then a/ is removed (the input gone). Tests copy what they
    change."""
    from click.testing import CliRunner

    from compressor.cli import main

    root = tmp_path_factory.mktemp("hf-run")
    shutil.copytree(tiny_llama, root / "a" / "tiny")
    done = CliRunner().invoke(main, ["run", str(root / "a" / "tiny"), "--out", str(root / "out"), *NO_BENCH])
    assert done.exit_code == 0, done.stderr
    shutil.rmtree(root / "a")
    return root


def test_check_reads_the_tokenizer_beside_the_artifact(compress, compress_here, hf_run, tmp_path):
    metadata = _metadata(hf_run / "out" / "model.onnx")
    assert not any(str(hf_run) in value for value in metadata.values())  # was: the input folder's absolute path
    config = json.loads(metadata[metadata_keys.MODEL_CONFIG])
    assert config["tokenizer"] == "tiny" and len(config["tokenizer_sha256"]) == 64
    # the input is gone: `compress check` reads the tokenizer copied beside the artifact (this width exports
    # without a KV cache, whose artifacts had no tokenizer beside them)
    out = tmp_path / "out"
    shutil.copytree(hf_run / "out", out)
    done = compress("check", str(out / "model.onnx"), "--baseline", str(out / "report.json"))
    assert done.returncode == 0 and done.stdout.startswith("ok: perplexity"), done.stderr
    # another tokenizer put beside it: refused, not scored with the wrong token ids
    with open(out / "tokenizer.json", "a") as handle:
        handle.write(" ")
    assert _one_line(compress_here("check", str(out / "model.onnx"), "--baseline", str(out / "report.json"))) == (
        f"error: {out / 'model.onnx'}: the tokenizer files beside it are not those it was made with (their sha256 "
        f"is not its compressor.model_config tokenizer_sha256)")


def test_an_artifact_of_an_earlier_version_still_finds_its_tokenizer(compress_here, hf_run, tiny_llama, tmp_path):
    """Earlier artifacts recorded the tokenizer's absolute folder and carried no tokenizer files beside them."""
    model = onnx.load(str(hf_run / "out" / "model.onnx"))

    def recorded(**changes) -> Path:
        for prop in model.metadata_props:
            if prop.key == metadata_keys.MODEL_CONFIG:
                config = {k: v for k, v in json.loads(prop.value).items() if k != "tokenizer_sha256"}
                prop.value = json.dumps({**config, **changes})
        (tmp_path / "old").mkdir(exist_ok=True)
        onnx.save(model, str(tmp_path / "old" / "model.onnx"))
        return tmp_path / "old" / "model.onnx"

    baseline = str(hf_run / "out" / "report.json")
    done = compress_here("check", str(recorded(tokenizer=str(Path(tiny_llama).resolve()))), "--baseline", baseline)
    assert done.returncode == 0 and done.stdout.startswith("ok: perplexity"), done.stderr
    line = _one_line(compress_here("check", str(recorded(tokenizer="tiny")), "--baseline", baseline))
    assert "no tokenizer files beside it" in line and "tokenizer must name the folder" in line  # a name, nothing beside


@pytest.mark.slow  # a second Hugging Face run: 10-30 s on the shared 2-core machine
def test_the_same_hf_folder_elsewhere_gives_the_same_artifact(compress_here, hf_run, tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "b" / "deeper" / "tiny")
    done = compress_here("run", str(tmp_path / "b" / "deeper" / "tiny"), "--out", str(tmp_path / "out"), *NO_BENCH)
    assert done.returncode == 0, done.stderr
    artifacts = [(folder / "model.onnx").read_bytes() for folder in (hf_run / "out", tmp_path / "out")]
    assert hashlib.sha256(artifacts[0]).digest() == hashlib.sha256(artifacts[1]).digest()  # was: two sha256s


def test_the_same_onnx_input_elsewhere_gives_the_same_artifact(compress, compress_here, shared_run, tmp_path):
    for where in ("a", "b/deeper"):
        shutil.copytree(shared_run("gpt-xs fp32").out, tmp_path / where / "xs-fp32")
    shas = []
    for index, (where, cli) in enumerate((("a", compress), ("b/deeper", compress_here))):
        out = tmp_path / f"out{index}"
        done = cli("run", str(tmp_path / where / "xs-fp32" / "model.onnx"), "--out", str(out), "--recipe", "int4",
                   *NO_BENCH)
        assert done.returncode == 0, done.stderr
        shas.append(hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest())
    assert shas[0] == shas[1]  # was: two sha256s (compressor.source held the input's path)
    assert _metadata(tmp_path / "out0" / "model.onnx")[metadata_keys.SOURCE] == "xs-fp32/model.onnx"


def test_a_recipe_file_is_recorded_by_its_name(compress_here, tmp_path):
    recipe = tmp_path / "deep" / "mine.yaml"
    recipe.parent.mkdir()
    recipe.write_text("passes:\n  - prune: {sparsity: 0.25}\n")
    done = compress_here("run", "gpt-xs", "--recipe", str(recipe), "--out", str(tmp_path / "out"), *NO_BENCH)
    assert done.returncode == 0, done.stderr
    assert json.loads(_metadata(tmp_path / "out" / "model.onnx")[metadata_keys.RECIPE])["name"] == "mine.yaml"

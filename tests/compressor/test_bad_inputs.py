"""A corpus of bad inputs run through the installed `compress` console script, as a user meets them: each exits 2
with one short `error:` line, no traceback, no artifact written, and no code from the input ever runs; an
existing artifact is only replaced with --force. Runs killed part-way: test_interrupted_runs.py."""
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from samples.registry import SHIPPED_DIR

from conftest import COMPRESS, ENV, NO_BENCH
MARKER = "pwned"  # what the pickled payloads would create, in the case's folder


class _RunsCode:
    """Unpickling this runs a shell command that creates the marker file: the loader must refuse first."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _checkpoint(folder: Path, sample: str = "gpt-xs", weights: bool = True) -> Path:
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    shutil.copy(SHIPPED_DIR / sample / "config.json", ckpt)
    if weights:
        shutil.copy(SHIPPED_DIR / sample / "model.safetensors", ckpt)
    return ckpt


def _replace_file(folder: Path, name: str, content: bytes, weights: bool = True) -> list[str]:
    ckpt = _checkpoint(folder, weights=weights)
    (ckpt / name).write_bytes(content)
    return [str(ckpt)]


def _weights_alone(folder: Path) -> list[str]:
    ckpt = _checkpoint(folder)
    (ckpt / "config.json").unlink()
    return [str(ckpt / "model.safetensors")]


def _edit_config(folder: Path, **changes) -> list[str]:
    ckpt = _checkpoint(folder)
    record = json.loads((ckpt / "config.json").read_text())
    record["config"].update(changes.pop("config", {}))
    record.update(changes)
    (ckpt / "config.json").write_text(json.dumps(record))
    return [str(ckpt)]


def _edit_weights(folder: Path, edit: Callable[[bytes], bytes]) -> list[str]:
    ckpt = _checkpoint(folder)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    return [str(ckpt)]


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _poison(folder: Path, value: float) -> list[str]:
    ckpt = _checkpoint(folder)
    state = load_file(ckpt / "model.safetensors")
    state["blocks.1.mlp.fc_in.weight"][3, 5] = value
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    return [str(ckpt)]


def _pickled(folder: Path, name: str, raw: bool = False) -> list[str]:
    ckpt = _checkpoint(folder, weights=False)
    if raw:
        (ckpt / name).write_bytes(pickle.dumps({"token_emb.weight": _RunsCode()}))
    else:
        torch.save({"token_emb.weight": _RunsCode()}, ckpt / name)
    return [str(ckpt)]


def _unreadable_weights_recipe(folder: Path, *recipe: str) -> list[str]:
    """A recipe error must win over broken weights: it is found before any weight is read."""
    return _edit_weights(folder, lambda data: data[:100]) + list(recipe)


def _recipe_file(folder: Path, text: str) -> list[str]:
    (folder / "recipe.yaml").write_text(text)
    return _unreadable_weights_recipe(folder, "--recipe", str(folder / "recipe.yaml"))


EARLIER_ARTIFACT, EARLIER_MTIME_NS = b"an earlier run's artifact", 1_500_000_000_123_456_789


def _existing_artifact(folder: Path) -> list[str]:
    out = folder / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(EARLIER_ARTIFACT)
    os.utime(out / "model.onnx", ns=(EARLIER_MTIME_NS, EARLIER_MTIME_NS))
    (out / "report.json").write_text("{}")
    return ["gpt-xs"]


def _unchanged(folder: Path) -> None:
    artifact = folder / "out" / "model.onnx"
    assert artifact.read_bytes() == EARLIER_ARTIFACT and artifact.stat().st_mtime_ns == EARLIER_MTIME_NS
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["model.onnx", "report.json"]


def _file_in_the_way(folder: Path, out: str) -> list[str]:
    (folder / "a-file").write_text("not a folder")
    return ["gpt-xs", "--out", str(folder / out)]


def _read_only_out(folder: Path) -> list[str]:
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return ["gpt-xs", "--out", str(locked / "out")]


# name -> (builder: case folder -> `compress run` arguments, what the error line must say). Those in IN_A_PROCESS
# run as a user runs them, the console script in a fresh process (about 4 s each, most of it importing torch); the
# others go through the same CLI in-process (click's test runner), as IN_PROCESS_CASES do.
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # checkpoints
    "path-does-not-exist": (lambda d: [str(d / "nowhere")], "not found"),
    "folder-without-weights": (lambda d: [str(_checkpoint(d, weights=False))], "no model.safetensors"),
    "truncated-safetensors": (lambda d: _edit_weights(d, lambda b: b[: len(b) // 2]), "safetensors"),
    "corrupt-safetensors-header": (lambda d: _edit_weights(d, lambda b: b[:40] + b"\xff" * 32 + b[72:]),
                                   "safetensors"),
    "pickle-with-code-model-pt": (lambda d: _pickled(d, "model.pt"), "unsupported GLOBAL posix.system"),
    "pickle-with-code-legacy-format": (lambda d: _pickled(d, "pytorch_model.bin", raw=True), "weights_only"),
    "config-not-json": (lambda d: _replace_file(d, "config.json", b"{oops"), "not valid JSON"),
    "config-wrong-family": (lambda d: _edit_config(d, family="bert"), "unknown model family 'bert'"),
    "config-wider-than-weights": (lambda d: _edit_config(d, config={"width": 128}), "shape"),
    "nan-weight": (lambda d: _poison(d, float("nan")), "NaN or Inf"),
    # output folder
    "out-under-a-file": (lambda d: _file_in_the_way(d, "a-file/out"), "cannot write to --out"),
    "out-read-only": (_read_only_out, "cannot write to --out"),
    "existing-artifact-without-force": (_existing_artifact, "already exists (pass --force"),
    # recipes: each is found before the checkpoint's (unreadable) weights are touched
    "unknown-pass": (lambda d: _unreadable_weights_recipe(d, "--set", "quantise.bits=4"), "did you mean 'quantize'?"),
    "unknown-key": (lambda d: _unreadable_weights_recipe(d, "--recipe", "int4", "--set", "quantize.bitz=4"),
                    "did you mean 'bits'?"),
    "bits-9": (lambda d: _unreadable_weights_recipe(d, "--recipe", "int4", "--set", "quantize.bits=9"), "bits must"),
    "block-size-not-power-of-two": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4", "--set", "quantize.block_size=48"), "power of two"),
    # gpt-xs's Linear layers take 64 or 256 inputs: whole blocks of 512 (codebook types need whole blocks; int
    # rounding takes a shorter last one) fit none of them, which config.json alone shows
    "block-size-divides-no-layer": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "nf4", "--set", "quantize.block_size=512"), "block_size 512 divides the in_features of none"),
    "wrong-stage-order": (lambda d: _recipe_file(d, "passes:\n  - quantize: {bits: 4}\n  - prune: {sparsity: 0.5}\n"),
                          "stage order"),
    "empty-calibration-data": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4-gptq", "--set", "quantize.calibration_samples=0"), "calibration_samples must be at least"),
    # a per-layer override whose pattern would backtrack for hours on one module name, inside the run
    "override-regex-nested-repeats": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4", "--set", 'quantize.overrides={"re:(a+)+$": {bits: 8}}'),
        "quantize.overrides: 're:(a+)+$' nests a repeat"),
}
# More of the same (and siblings of the cases above), run in-process through the same CLI (click's test runner:
# exit code and output as a user sees them) to spare the start-up of a process each.
IN_PROCESS_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "zero-byte-safetensors": (lambda d: _edit_weights(d, lambda b: b""), "safetensors"),
    "config-not-a-dict": (lambda d: _replace_file(d, "config.json", b"[1, 2]"), "not a compressor checkpoint config"),
    "inf-weight": (lambda d: _poison(d, float("-inf")), "NaN or Inf"),
    "bits-0": (lambda d: _unreadable_weights_recipe(d, "--recipe", "int4", "--set", "quantize.bits=0"), "bits must"),
    "bits-1": (lambda d: _unreadable_weights_recipe(d, "--recipe", "int4", "--set", "quantize.bits=1"), "bits must"),
    "weights-without-config": (_weights_alone, "config.json is missing"),
    "huge-safetensors-header-length": (lambda d: _edit_weights(d, lambda b: struct.pack("<Q", 1 << 62) + b[8:]),
                                       "header too large"),
    "header-dtype-flipped-to-int": (lambda d: _edit_weights(d, lambda b: b[:8] + b[8: 8 + _header_length(b)].replace(
        b'"F16"', b'"I16"') + b[8 + _header_length(b):]), "dtype int16"),
    "zero-byte-model-pt": (lambda d: _replace_file(d, "model.pt", b"", weights=False), "weights_only"),
    "pickle-named-safetensors": (lambda d: _pickled(d, "model.safetensors", raw=True), "safetensors"),
    "config-zero-heads": (lambda d: _edit_config(d, config={"heads": 0}), "invalid model config"),
    "config-negative-width": (lambda d: _edit_config(d, config={"mlp_hidden": -5}), "invalid model config"),
    "config-fewer-layers-than-weights": (lambda d: _edit_config(d, config={"layers": 1}), "does not match"),
    "config-vocab-too-big-to-allocate": (lambda d: _edit_config(d, config={"vocab_size": 10 ** 10}),
                                         "does not describe these weights"),  # refused before any build
    "out-is-a-file": (lambda d: _file_in_the_way(d, "a-file"), "not a folder"),
    "unknown-preset": (lambda d: _unreadable_weights_recipe(d, "--recipe", "int5"), "unknown recipe 'int5'"),
    "n-of-m-divides-no-layer": (lambda d: _unreadable_weights_recipe(d, "--set", "prune.pattern=2:512"),
                                "divides the in_features of none"),
    "targets-select-nothing": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4", "--set", "quantize.targets=no.such.layer"), "select no nn.Linear"),
    "targets-bad-regex": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4", "--set", "quantize.targets=re:(mlp"), "not a valid regular expression"),
    "structured-prune-no-calibration": (lambda d: _unreadable_weights_recipe(
        d, "--set", "structured_prune.calibration_samples=0"), "calibration_samples must be at least 1"),
    "heal-nan-learning-rate": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "lowrank", "--set", "heal.learning_rate=.nan"), "learning_rate"),
    "gptq-zero-damp": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4-gptq", "--set", "quantize.gptq_damp=0"), "gptq_damp"),
    "gate-not-yaml": (lambda d: _unreadable_weights_recipe(d, "--set", "gates.min_recovery=[0.9"), "cannot read"),
    "gate-nan": (lambda d: _unreadable_weights_recipe(d, "--set", "gates.min_recovery=.nan"), "positive number"),
    "gate-parity-not-bool": (lambda d: _unreadable_weights_recipe(d, "--set", "gates.require_parity=maybe"),
                             "true or false"),
    "recipe-not-yaml": (lambda d: _recipe_file(d, "passes: [quantize: {bits: 4\n"), "not valid YAML"),
    "recipe-missing": (lambda d: _unreadable_weights_recipe(d, "--recipe", str(d / "nope.yaml")), "cannot read recipe"),
    "recipe-targets-not-names": (lambda d: _recipe_file(d, "passes:\n  - quantize: {targets: [1, 2]}\n"),
                                 "must be a list of module names"),
    "override-regex-overlapping-alternatives": (lambda d: _recipe_file(
        d, "passes:\n  - quantize: {bits: 4, overrides: {'re:^(block|blocks|s)+$': {bits: 8}}}\n"),
        "repeats alternatives that can match the same text"),
    "override-regex-repeated-optional": (lambda d: _unreadable_weights_recipe(
        d, "--set", 'quantize.overrides={"re:(a?){30}a{30}": {bits: 8}}'), "nests a repeat"),
    "targets-regex-competing-repeats": (lambda d: _unreadable_weights_recipe(
        d, "--recipe", "int4", "--set", "quantize.targets=re:.*.*.*.*.*x"), "5 repeats that compete"),
    "ignore-regex-overlong": (lambda d: _unreadable_weights_recipe(
        d, "--set", "prune.ignore=re:" + "(lm_head)?" * 30), "longer than 256 characters"),
    "negative-seed": (lambda d: ["gpt-xs", "--seed", "-1"], "Invalid value for '--seed'"),
    "unknown-provider": (lambda d: ["gpt-xs", "--provider", "tpu"], "Invalid value for '--provider'"),
}
# one of each kind (a checkpoint whose pickle would run code, an --out that cannot be written, a recipe), the last
# also the hang-prone one
IN_A_PROCESS = ("pickle-with-code-model-pt", "out-under-a-file", "override-regex-nested-repeats")
RUNS_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SKIPPED = {"out-read-only": "root ignores directory permissions (out-under-a-file covers an --out that cannot be "
                            "written)"} if RUNS_AS_ROOT else {}


ALL_CASES = {**CASES, **IN_PROCESS_CASES}


def _arguments(name: str, folder: Path) -> list[str]:
    build = ALL_CASES[name][0]
    args = build(folder)
    return args if "--out" in args else [*args, "--out", str(folder / "out")]


def _run_case(name: str, folder: Path) -> tuple[int, str]:
    result = subprocess.run([*COMPRESS, "run", *_arguments(name, folder), *NO_BENCH], capture_output=True,
                            text=True, cwd=folder, env=ENV, timeout=120)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[tuple[int, str], Path]]:
    """Every process case at once (they are start-up bound), then each test reads its own result."""
    names = [n for n in IN_A_PROCESS if n not in SKIPPED]
    folders = {name: tmp_path_factory.mktemp(name) for name in names}
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        results = dict(zip(names, pool.map(lambda n: _run_case(n, folders[n]), names)))
    return {name: (results[name], folders[name]) for name in names}


def _assert_one_line_error(returncode: int, stderr: str, needle: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and len(lines[0]) < 400, lines[0]
    assert needle in lines[0], lines[0]


def _assert_nothing_written(name: str, folder: Path) -> None:
    if name not in ("existing-artifact-without-force", "out-is-a-file"):
        assert not (folder / "out").exists(), "the failed run created its output folder"
    assert not list(folder.rglob("*.partial"))
    if name == "existing-artifact-without-force":
        _unchanged(folder)
    else:
        assert not list(folder.rglob("model.onnx"))
    assert not (folder / MARKER).exists(), "code from the input ran"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skip(SKIPPED[n])) if n in SKIPPED else n
                                  for n in ALL_CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(corpus, compress_here, tmp_path, name):
    if name in IN_A_PROCESS:
        (returncode, stderr), folder = corpus[name]
    else:  # run in the case's folder: where a pickle's payload would leave its marker
        done = compress_here("run", *_arguments(name, tmp_path), *NO_BENCH, cwd=tmp_path)
        (returncode, stderr), folder = (done.returncode, done.stdout + done.stderr), tmp_path
    _assert_one_line_error(returncode, stderr, ALL_CASES[name][1])
    _assert_nothing_written(name, folder)


# --- weights that cannot be mapped: an address-space limit (RLIMIT_AS, `ulimit -v`) ----------------------------

ADDRESS_SPACE = 64 << 30  # ample for Python, torch and ONNX Runtime to start (they take ~1 GiB) ...
SPARSE_WEIGHTS = 1 << 40  # ... but not for mapping a 1 TiB weights file (sparse: it takes 4 KiB of disk)


def _sparse_safetensors(path: Path, size: int = SPARSE_WEIGHTS) -> None:
    """A valid safetensors file of one float32 tensor of `size` bytes, all zeros and never written: a sparse file.
    Skips where the filesystem would really allocate it."""
    header = json.dumps({"big": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    if path.stat().st_blocks * 512 > 1 << 20:
        path.unlink()
        pytest.skip(f"the filesystem of {path.parent} does not keep sparse files")


def _run_with_address_space_limit(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    import resource

    def limit():  # in the child, before `compress` starts: its whole life runs under the limit
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    return subprocess.run([*COMPRESS, "run", *args, *NO_BENCH], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=300, preexec_fn=limit)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux applies it to mmap")
def test_weights_larger_than_the_address_space_are_one_line_exit_2(tmp_path):
    """safetensors maps the file (it is not read): under the limit the mmap fails with ENOMEM, a MemoryError from
    safetensors' own mapping or a RuntimeError from torch's; either was an 'unexpected ... (a bug)' exit 3."""
    ckpt = _checkpoint(tmp_path, weights=False)
    _sparse_safetensors(ckpt / "model.safetensors")
    done = _run_with_address_space_limit([str(ckpt), "--out", str(tmp_path / "out")], tmp_path)
    _assert_one_line_error(done.returncode, done.stderr, f"cannot map weights file {ckpt / 'model.safetensors'}: "
                                                         "out of address space/memory (1024.00 GiB file, "
                                                         "address-space limit 64.00 GiB)")
    _assert_nothing_written("address-space", tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux applies it to mmap")
def test_hf_weights_larger_than_the_address_space_are_one_line_exit_2(tiny_llama, tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    _sparse_safetensors(folder / "model.safetensors")
    done = _run_with_address_space_limit([str(folder), "--out", str(tmp_path / "out")], tmp_path)
    _assert_one_line_error(done.returncode, done.stderr, f"cannot map weights file {folder / 'model.safetensors'}: "
                                                         "out of address space/memory")
    _assert_nothing_written("address-space", tmp_path)


def test_force_replaces_an_existing_artifact(compress_here, tmp_path):
    out = tmp_path / "out"
    checkpoint = _existing_artifact(tmp_path)
    result = compress_here("run", *checkpoint, "--out", str(out), "--force", *NO_BENCH)
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert json.loads((out / "report.json").read_text())["artifact"]["bytes"] == (out / "model.onnx").stat().st_size

"""Shared test helpers: the shipped samples, the CLI as a user runs it, runs shared by several test files,
quantized-artifact builders."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest

from samples.registry import SHIPPED_DIR

REPO = Path(__file__).parents[1]
_SCRIPT = Path(sys.executable).with_name("compress")
COMPRESS = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "compressor.cli"]  # the console script
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FAST = ["--eval-limit", "8", "--bench-runs", "2", "--quiet"]  # a run that ends soon
# for tests that assert nothing on latency or generation speed: no benchmark child processes at all
NO_BENCH = ["--eval-limit", "8", "--no-bench", "--quiet"]
# runs that several test files read, done once per session: shared_run(NAME)
SHARED_RUNS = {
    "gpt-xs fp32": ("gpt-xs", *NO_BENCH),
    "gpt-xs int4": ("gpt-xs", "--recipe", "int4", *FAST),  # with its latency and generation figures
    "gpt-xs int4 B32": ("gpt-xs", "--recipe", "int4", "--set", "quantize.block_size=32", "--eval-limit", "16",
                        "--no-bench", "--quiet"),
}


def pytest_configure(config):
    """Under pytest-xdist (`-n N`), each worker and the `compress` processes it starts take 1/N of the cores:
    torch's and ONNX Runtime's spinning thread pools, each sized for the whole machine, make N workers slower
    than one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.update(OMP_NUM_THREADS=threads, COMPRESSOR_ORT_THREADS=threads)
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def shipped() -> Path:
    return SHIPPED_DIR


def run_compress(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The `compress` command in a child process, as a user runs it (real exit code, real stderr)."""
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="session")
def compress():
    return run_compress


def run_compress_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The same `compress` CLI in this process (click's test runner: its exit code, stdout and stderr as a user
    sees them), without a process start-up (~4 s, mostly importing torch): for refusals, which end before any
    work. A few cases per kind still run as processes (run_compress)."""
    from click.testing import CliRunner

    from compressor.cli import main

    before = os.getcwd()
    os.chdir(cwd or before)
    try:
        result = CliRunner().invoke(main, list(args))
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def compress_here():
    return run_compress_here


def _built_once(tmp_path_factory, key: str, build) -> Path:
    """`build(folder)` done once per test session, by whichever test asks first, on whichever xdist worker (one
    test file per worker, so a fixture's own scope would build it once per worker); the others wait for it and
    get the same folder. Tests read it and never write into it (copy what they change)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"  # this session's
    root.mkdir(exist_ok=True)
    folder = root / key
    with open(root / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        if not (root / f"{key}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (root / f"{key}.done").touch()
    return folder


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """`shared_run(NAME)`: `compress run ARGS --out DIR` for SHARED_RUNS[NAME] (in-process), done once per test
    session (_built_once): its CompletedProcess, whose `out` is DIR."""

    def run(name: str) -> subprocess.CompletedProcess:
        args = SHARED_RUNS[name]

        def build(folder: Path) -> None:
            done = run_compress_here("run", *args, "--out", str(folder / "out"))
            (folder / "result.json").write_text(json.dumps([done.returncode, done.stdout, done.stderr]))

        folder = _built_once(tmp_path_factory, name.replace(" ", "-"), build)
        done = subprocess.CompletedProcess(args, *json.loads((folder / "result.json").read_text()))
        assert done.returncode == 0, done.stderr
        done.out = folder / "out"
        return done

    return run


def _quantized_artifact(shipped: Path, tmp_path: Path, config, name: str = "gpt-xs"):
    """A shipped sample quantized with `config` (QuantizeConfig), exported and lowered to QDQ: returns
    (checkpoint, task, held-out data, quantize record, lowering record, artifact path)."""
    from compressor.onnx_file import save_onnx
    from compressor.inputs.checkpoint import load_checkpoint
    from compressor.tasks import TASKS
    from exporters.onnx_export import export_onnx, finalize
    from exporters.qdq import lower_to_qdq
    from passes.quantize import quantize_model

    checkpoint = load_checkpoint(shipped / name)
    task = TASKS[checkpoint.family]
    calibration = task.calibration_data(checkpoint.config, 32) if config.needs_calibration else None
    record = quantize_model(checkpoint.model, config, calibration)
    data = task.heldout_data(checkpoint.config, 32)
    proto = export_onnx(checkpoint.model, task.parity_inputs(data), task.dynamic_axes(checkpoint.config),
                        task.OUTPUT_NAME)
    proto, lowering = lower_to_qdq(proto, record["quantized"])
    path = tmp_path / f"{config.label()}.onnx"
    save_onnx(finalize(proto, {}), path)
    return checkpoint, task, data, record, lowering, path


@pytest.fixture(scope="session")
def quantized_artifact():
    return _quantized_artifact


def _optimized_ops(path: Path, tmp_path: Path) -> tuple[Counter, list]:
    """Op counts of ONNX Runtime's optimized CPU graph of `path`, and the bits of each MatMulNBits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in optimized.graph.node
            if n.op_type == "MatMulNBits"]
    return Counter(n.op_type for n in optimized.graph.node), bits


@pytest.fixture(scope="session")
def optimized_ops():
    return _optimized_ops


def bpe_tokenizer(folder: Path) -> int:
    """A 400-token byte-level BPE learnt from the train split (never the held-out one)."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    from samples import wiki_corpus

    text = wiki_corpus.split_tokens("train")[:200_000].tobytes().decode("utf-8", "ignore")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                     pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def tiny_llama_folder(folder: Path, hidden_size: int) -> Path:
    """A randomly initialised 2-layer Llama (4 heads, 2 KV heads, tied head) with a BPE tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    vocab = bpe_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def make_tiny_llama():
    """tiny_llama_folder, for a test that needs another width (test files cannot import one conftest by name
    safely: another folder's conftest.py may have taken the name by then)."""
    return tiny_llama_folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Width 96: heads of 24 (not a multiple of 16: exported without a KV cache) and a partial 64-block. Built once
    for all test files: copy it to change it."""
    return _built_once(tmp_path_factory, "tiny-llama-96", lambda folder: tiny_llama_folder(folder, 96))

"""ONNX Runtime sessions and the one place where inputs become ORT feeds."""
import os
from pathlib import Path

import numpy as np

from compressor.errors import UserError
from compressor.kv_cache import complete_feeds

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
THREADS_VARIABLE = "COMPRESSOR_ORT_THREADS"  # intra-op threads of every session, for processes that share cores
MAX_THREADS = 1024  # as `compress bench --threads`: more threads than any machine has cores only costs memory
_default_threads: int | None = None  # None: $COMPRESSOR_ORT_THREADS, else ONNX Runtime's default (one per core)


def set_default_threads(threads: int | None) -> None:
    """Intra-op threads of the sessions this process creates without a `threads` of their own: the workers of a
    sweep share the machine's cores, so each takes its share instead of a pool of all of them."""
    global _default_threads
    _default_threads = threads


def to_ort_feeds(inputs: dict, session=None) -> dict[str, np.ndarray]:
    """{input name: int array or torch tensor} -> contiguous int64 numpy arrays, the dtype our exports take.
    Given the session, a decoder with a KV cache also gets the rest of a full-sequence call (mask, empty pasts)."""
    feeds = {}
    for name, value in inputs.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        feeds[name] = np.ascontiguousarray(array, dtype=np.int64)
    return feeds if session is None else complete_feeds(session, feeds)


def check_providers(providers) -> None:
    """Fail before any work when an asked-for execution provider is missing here."""
    if "cuda" in providers:
        import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu links against)
    import onnxruntime as ort

    for provider in providers:
        if provider not in PROVIDERS:
            raise UserError(f"unknown execution provider {provider!r} (known: {', '.join(PROVIDERS)})")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise UserError(f"ONNX Runtime here has no {PROVIDERS[provider]} (install onnxruntime-gpu for cuda)")


def headline_provider(by_provider: dict) -> str:
    """Which of a run's per-provider figures is its headline: cpu's where cpu was measured, else the first."""
    return "cpu" if "cpu" in by_provider else next(iter(by_provider))


def create_session(path: Path | bytes, provider: str = "cpu", threads: int | None = None, options: dict | None = None):
    """A session over a model file, or over a serialized model (bytes)."""
    check_providers((provider,))
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    threads = threads or _default_threads or _threads_from_environment()
    if threads:
        session_options.intra_op_num_threads = threads
    for key, value in (options or {}).items():
        session_options.add_session_config_entry(key, str(value))
    # TF32 off: the CUDA EP's default TF32 matmuls moved fp32 logits by 4e-4 (gpt-l) to 3e-3 (seq2seq) relative
    # on an H100, which would hide real export errors; fp32 artifacts are validated as fp32.
    chosen = (PROVIDERS[provider], {"use_tf32": "0"}) if provider == "cuda" else PROVIDERS[provider]
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, session_options, providers=[chosen])


def _threads_from_environment() -> int | None:
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_THREADS:  # "²".isdigit() is True
        raise UserError(f"{THREADS_VARIABLE} must be a whole number of threads in 1..{MAX_THREADS}, not "
                        f"{value[:20]!r}")
    return int(value)


def logits_fn(session):
    """A function {input name: array} -> first output, the shape evaluate() in compressor.tasks expects."""
    def run(inputs: dict) -> np.ndarray:
        return session.run(None, to_ort_feeds(inputs, session))[0]

    return run

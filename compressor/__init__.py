"""compressor: prune, low-rank, k-bit quantize and fuse Transformers into QDQ ONNX validated under ONNX Runtime."""
from compressor.version import __version__  # noqa: F401  (compressor.__version__)


def compress(*args, **kwargs) -> dict:
    """compressor.api.compress (imported on first call: `import compressor` stays light for the CLI)."""
    from compressor.api import compress as _compress

    return _compress(*args, **kwargs)

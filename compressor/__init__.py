"""compressor: prune, low-rank, k-bit quantize and fuse Transformers into QDQ ONNX validated under ONNX Runtime."""
__version__ = "0.1.0"


def compress(*args, **kwargs) -> dict:
    """compressor.api.compress (imported on first call: `import compressor` stays light for the CLI)."""
    from compressor.api import compress as _compress

    return _compress(*args, **kwargs)

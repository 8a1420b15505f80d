"""compressor: prune, low-rank, k-bit quantize and fuse Transformers into QDQ ONNX validated under ONNX Runtime."""
__version__ = "0.1.0"

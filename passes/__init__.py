"""Compression passes (prune, low-rank, quantize on torch modules; fuse on ONNX graphs), registered by name."""

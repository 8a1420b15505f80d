"""What a decode step must read, and how fast this machine reads: the floor of benchmarks/generation.py.

A decode step reads every weight once (the embedding table only for one row), so its time cannot be below
weight bytes / memory bandwidth. Bandwidth is measured here with `threads` threads summing a 1 GiB fp32 tensor
(torch's multi-threaded reduction: a pure read stream, far larger than any cache), best of 5.
"""
import time
from pathlib import Path

import numpy as np
import onnx

LOOKUP_OPS = {"Gather", "GatherBlockQuantized"}  # read one row per token, not the table


def read_bandwidth_bytes_per_s(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    values = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    values.sum()
    best = min(_timed(values.sum) for _ in range(5))
    return values.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    width = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * width


def onnx_decode_bytes(path: Path) -> int:
    """Bytes of the initializers a decode step reads: all but those only table lookups read."""
    proto = onnx.load(str(path), load_external_data=False)
    readers: dict[str, set] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    lookups_only = {name for name, ops in readers.items() if ops <= LOOKUP_OPS}
    return sum(_initializer_bytes(t) for t in proto.graph.initializer if t.name not in lookups_only)


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors a decode step reads: all but token_embd when an output.weight exists (tied
    models multiply by token_embd, so it is read whole)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    return sum(tensors.values()) - (tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0)

"""The memory a streamed run may use (--max-memory, default: what the machine has available now) and the check,
from headers alone, that its largest part fits before any weight is read."""
import resource
from pathlib import Path

import numpy as np

from compressor.errors import UserError

# what the process holds before any weight: torch, transformers, ONNX Runtime and onnx themselves (measured about
# 0.7 GB RSS on this machine), with room for the allocator's slack
BASE_BYTES = 1 << 30
# copies of the largest part alive at once, measured: Qwen2.5-1.5B's untied head (0.93 GB in fp32) peaked at 5.57 GiB
# (the weight, the dequantized weight the pass leaves, its codes, the part's fp32 graph, the lowering's output)
LARGEST_PART_COPIES = 5


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fp32_bytes(store) -> int:
    """The model's weights as fp32, from headers alone."""
    return sum(int(np.prod(entry.shape, dtype=np.int64)) * 4 for entry in store.entries.values())


def largest_part_fp32_bytes(store) -> int:
    """The largest unit held at once (a decoder layer, or the token table / head), as fp32."""
    sizes: dict[str, int] = {}
    for name, entry in store.entries.items():
        parts = name.split(".")
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else name
        sizes[key] = sizes.get(key, 0) + int(np.prod(entry.shape, dtype=np.int64)) * 4
    return max(sizes.values())


def needed_bytes(store, stream_bytes: int) -> int:
    return BASE_BYTES + LARGEST_PART_COPIES * largest_part_fp32_bytes(store) + stream_bytes


def check_fits(store, stream_bytes: int, max_memory: int | None) -> int:
    """The budget in bytes; UserError (one line, with the ways out) when the largest part cannot fit it."""
    budget = max_memory or available_bytes()
    need = needed_bytes(store, stream_bytes)
    if need > budget:
        raise UserError(f"a streamed run of this model needs about {need / 2**30:.1f} GiB (its largest part "
                        f"{largest_part_fp32_bytes(store) / 2**30:.2f} GiB in fp32 x{LARGEST_PART_COPIES}, "
                        f"activations {stream_bytes / 2**30:.2f} GiB) and may use {budget / 2**30:.1f} GiB: lower "
                        f"--eval-limit or the calibration samples, or raise --max-memory on a larger machine")
    return budget

"""How much memory one batch of outputs may take while an artifact is scored and timed: the one knob from which
the evaluation batch, the parity windows and the latency benchmark's batch sizes follow for a model's vocabulary.

A decoder's fp32 logits are rows x positions x vocabulary x 4 bytes, and ONNX Runtime holds a copy of its own while
it hands them over: Qwen2.5's 151,936-token vocabulary makes a 256-token window 156 MB, so the 4-window evaluation
batch of a 49k-token vocabulary (201 MB) would be 622 MB, and a batch-16 latency run 2.5 GB. Within the budget the
batch sizes are those of before (the samples' and SmolLM2's evaluation and parity batches are unchanged);
above it they shrink, never below one row."""

LOGITS_BUDGET_BYTES = 256 << 20  # read at each call: tests patch it
FLOAT_BYTES = 4  # the outputs are fp32 (float16 artifacts' logits leave the graph as fp32 too)


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def rows_within_budget(row_bytes: int, most: int) -> int:
    """How many rows of `row_bytes` output each, at most `most` and at least 1, fit LOGITS_BUDGET_BYTES."""
    return max(1, min(most, LOGITS_BUDGET_BYTES // max(1, row_bytes)))


def logits_row_bytes(positions: int, vocab: int | None) -> int:
    """One row's fp32 logits over `positions` tokens; 0 where the vocabulary is not known (no limit then)."""
    return positions * (vocab or 0) * FLOAT_BYTES


def over_budget(output_bytes: int) -> str | None:
    """Why a batch whose outputs take `output_bytes` is not run, or None where it fits the budget."""
    if output_bytes <= LOGITS_BUDGET_BYTES:
        return None
    return (f"its fp32 outputs would take {mib(output_bytes)}, over the {mib(LOGITS_BUDGET_BYTES)} logits budget "
            f"(compressor.tasks.logits_budget)")

"""Next-byte prediction on held-out text; metric = perplexity (exp of mean NLL per byte). The corpus is the one
the model's config names (GPTConfig.corpus: the Wikipedia dump by default, the text corpus for the family)."""
import math

import numpy as np
from tqdm import tqdm

from compressor.errors import UserError
from compressor.tasks import logits_budget
from samples.registry import corpus_module

METRIC = "perplexity"
HIGHER_IS_BETTER = False
INPUT_NAMES = ("input_ids",)
OUTPUT_NAME = "logits"
FITS_REFERENCE = False
EVAL_BATCH = 32  # windows a batch, fewer where their logits pass compressor.tasks.logits_budget
PARITY_WINDOWS = 16  # the same


class Windows(np.ndarray):
    """Held-out windows [N, context + 1] of token ids that know the vocabulary their logits span (`vocab_size`,
    None where unknown): evaluate and parity_inputs size their batches by it (compressor.tasks.logits_budget),
    as the task protocol gives them the data alone. Slices keep it; pickles too."""

    vocab_size: int | None = None

    def __array_finalize__(self, obj) -> None:
        self.vocab_size = getattr(obj, "vocab_size", None)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        """Arithmetic and reductions give plain arrays (and scalars): only the windows themselves are Windows."""
        array = np.asarray(array).view(np.ndarray)
        return array[()] if return_scalar else array

    def __reduce__(self):
        rebuild, args, state = super().__reduce__()
        return rebuild, args, (state, self.vocab_size)

    def __setstate__(self, state) -> None:
        state, self.vocab_size = state
        super().__setstate__(state)


def as_windows(windows: np.ndarray, vocab_size: int | None) -> Windows:
    """`windows` (not copied) as Windows of that vocabulary; a vocabulary of 0 or None is an unknown one."""
    result = np.asarray(windows).view(Windows)
    result.vocab_size = int(vocab_size) if vocab_size else None
    return result


def window_count(windows: np.ndarray, most: int) -> int:
    """Windows a batch: `most`, fewer where their logits pass the budget, at least 1."""
    positions = windows.shape[1] - 1 if windows.ndim == 2 else 0
    return logits_budget.rows_within_budget(
        logits_budget.logits_row_bytes(positions, getattr(windows, "vocab_size", None)), most)


def dynamic_axes(config: dict) -> dict:
    return {"input_ids": {0: ("batch", 1024), 1: ("sequence", config["context"])}}


def _corpus(config: dict):
    return corpus_module(config.get("corpus", "wiki"))


def _read(split_reader):
    """A corpus read; a corpus that cannot be built (a Debian package missing) is the user's to fix."""
    from samples.text_corpus import CorpusUnavailable

    try:
        return split_reader()
    except CorpusUnavailable as exc:
        raise UserError(str(exc)) from None


def heldout_data(config: dict, limit: int | None = None) -> Windows:
    return as_windows(_read(lambda: _corpus(config).heldout_windows(config["context"], limit)),
                      config.get("vocab_size"))


def _nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed in float64 one window at a time, a few positions at a time: a 256-token window of a 152k-token
    vocabulary is 311 MB in float64, and its softmax takes two more of that; here the float64 scratch stays within
    a sixteenth of the logits budget (x3). Each position's NLL is computed alone and a window's are summed at once,
    so the sum is the same whatever the chunk."""
    total = 0.0
    chunk = max(1, logits_budget.LOGITS_BUDGET_BYTES // 16 // max(1, logits.shape[-1] * 8))  # 16 MiB
    for row_logits, row_targets in zip(logits, targets):
        nll = np.empty(len(row_logits), np.float64)
        for start in range(0, len(row_logits), chunk):
            row = row_logits[start : start + chunk].astype(np.float64)
            peak = row.max(-1, keepdims=True)
            log_norm = np.log(np.exp(row - peak).sum(-1)) + peak[..., 0]
            picked = np.take_along_axis(row, row_targets[start : start + chunk, None], -1)[..., 0]
            nll[start : start + chunk] = log_norm - picked
            del row
        total += float(nll.sum())
    return total


def evaluate(logits_fn, windows: np.ndarray, progress: bool = False, batch_size: int = EVAL_BATCH) -> float:
    """Perplexity over `windows`, `batch_size` windows a call, fewer where their logits pass the budget (their
    `vocab_size`: compressor.tasks.logits_budget)."""
    total, count = 0.0, 0
    batch_size = window_count(windows, batch_size)
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size]
        total += _nll_sum(logits_fn({"input_ids": batch[:, :-1]}), batch[:, 1:])
        count += batch[:, 1:].size
    return math.exp(total / count)


def evaluate_all(logits_fn, windows: np.ndarray, progress: bool = False) -> dict:
    return {METRIC: evaluate(logits_fn, windows, progress)}


def parity_inputs(windows: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": np.ascontiguousarray(windows[:window_count(windows, PARITY_WINDOWS), :-1])}


def benchmark_inputs(config: dict, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, config["vocab_size"], (batch_size, config["context"]), dtype=np.int64)}


def output_bytes(config: dict, inputs: dict[str, np.ndarray]) -> int:
    """Logits: a vocabulary's floats per input token."""
    return inputs["input_ids"].size * config["vocab_size"] * logits_budget.FLOAT_BYTES


def calibration_data(config: dict, samples: int, seed: int = 0) -> list[tuple]:
    """Random windows of the TRAIN split (never the held-out one), in batches of 16, as model args."""
    import torch

    tokens = _read(lambda: _corpus(config).split_tokens("train"))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - config["context"], size=samples)
    windows = np.stack([tokens[s : s + config["context"]] for s in starts]).astype(np.int64)
    return [(torch.from_numpy(windows[i : i + 16]),) for i in range(0, samples, 16)]

"""Next-byte prediction on held-out text; metric = perplexity (exp of mean NLL per byte). The corpus is the one
the model's config names (GPTConfig.corpus: the Wikipedia dump by default, the text corpus for the family)."""
import math

import numpy as np
from tqdm import tqdm

from compressor.errors import UserError
from samples.registry import corpus_module

METRIC = "perplexity"
HIGHER_IS_BETTER = False
INPUT_NAMES = ("input_ids",)
OUTPUT_NAME = "logits"
FITS_REFERENCE = False
EVAL_BATCH = 32


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


def heldout_data(config: dict, limit: int | None = None) -> np.ndarray:
    return _read(lambda: _corpus(config).heldout_windows(config["context"], limit))


def _nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed in float64 one window at a time: a whole batch in float64 is 8x a 49k-token vocabulary's logits."""
    total = 0.0
    for row_logits, row_targets in zip(logits, targets):
        row = row_logits.astype(np.float64)
        peak = row.max(-1, keepdims=True)
        log_norm = np.log(np.exp(row - peak).sum(-1)) + peak[..., 0]
        picked = np.take_along_axis(row, row_targets[..., None], -1)[..., 0]
        total += float((log_norm - picked).sum())
    return total


def evaluate(logits_fn, windows: np.ndarray, progress: bool = False, batch_size: int = EVAL_BATCH) -> float:
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size]
        total += _nll_sum(logits_fn({"input_ids": batch[:, :-1]}), batch[:, 1:])
        count += batch[:, 1:].size
    return math.exp(total / count)


def evaluate_all(logits_fn, windows: np.ndarray, progress: bool = False) -> dict:
    return {METRIC: evaluate(logits_fn, windows, progress)}


def parity_inputs(windows: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": np.ascontiguousarray(windows[:16, :-1])}


def benchmark_inputs(config: dict, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, config["vocab_size"], (batch_size, config["context"]), dtype=np.int64)}


def calibration_data(config: dict, samples: int, seed: int = 0) -> list[tuple]:
    """Random windows of the TRAIN split (never the held-out one), in batches of 16, as model args."""
    import torch

    tokens = _read(lambda: _corpus(config).split_tokens("train"))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - config["context"], size=samples)
    windows = np.stack([tokens[s : s + config["context"]] for s in starts]).astype(np.int64)
    return [(torch.from_numpy(windows[i : i + 16]),) for i in range(0, samples, 16)]

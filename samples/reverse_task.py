"""The seq2seq sample's task: reverse a sequence of 1..12 symbols. Deterministic given the seed.

Ids: 0 pad, 1 begin, 2 end, 3.. symbols. Exact match = the whole greedy-decoded output equals the reversal.
"""
from collections.abc import Callable

import numpy as np
import torch

from samples.seq2seq import PAD_ID

BOS_ID, EOS_ID, FIRST_SYMBOL = 1, 2, 3
SYMBOLS = 16
MIN_LENGTH, MAX_LENGTH = 1, 12
VOCAB_SIZE = FIRST_SYMBOL + SYMBOLS
HELDOUT_SEED_OFFSET = 1_000_003  # held-out examples come from a different stream than training ones

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def sample_sources(rng: np.random.Generator, count: int) -> list[list[int]]:
    lengths = rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=count)
    return [list(rng.integers(FIRST_SYMBOL, VOCAB_SIZE, size=int(n))) for n in lengths]


def pad(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def training_batch(rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, decoder input, labels); labels use PAD_ID where no loss is taken."""
    sources = sample_sources(rng, batch_size)
    targets = [src[::-1] for src in sources]
    src = pad(sources, MAX_LENGTH)
    tgt_in = pad([[BOS_ID] + t for t in targets], MAX_LENGTH + 1)
    labels = pad([t + [EOS_ID] for t in targets], MAX_LENGTH + 1)
    return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(labels)


def heldout_sources(seed: int, count: int) -> np.ndarray:
    """Padded [count, MAX_LENGTH] sources, disjoint in stream from training (different seed)."""
    rng = np.random.default_rng(seed + HELDOUT_SEED_OFFSET)
    return pad(sample_sources(rng, count), MAX_LENGTH)


def greedy_decode(logits_fn: LogitsFn, src: np.ndarray) -> np.ndarray:
    """Feed the decoder its own argmax one step at a time; returns [B, MAX_LENGTH + 1] ids after BOS."""
    tgt = np.full((src.shape[0], 1), BOS_ID, dtype=np.int64)
    for _ in range(MAX_LENGTH + 1):
        next_ids = logits_fn(src, tgt)[:, -1, :].argmax(-1)
        tgt = np.concatenate([tgt, next_ids[:, None].astype(np.int64)], axis=1)
    return tgt[:, 1:]


def exact_match(predicted: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Per example: does the prediction up to its first EOS equal the reversed source?"""
    hits = np.zeros(len(src), dtype=bool)
    for i, (pred, source) in enumerate(zip(predicted, src)):
        expected = [t for t in source if t != PAD_ID][::-1] + [EOS_ID]
        hits[i] = list(pred[: len(expected)]) == expected
    return hits

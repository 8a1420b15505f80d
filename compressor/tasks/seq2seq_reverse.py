"""The seq2seq sample's task: greedy-decode the reversal of held-out sequences; metric = exact match."""
import numpy as np
from tqdm import tqdm

from compressor.tasks import logits_budget
from samples import reverse_task

METRIC = "exact_match"
HIGHER_IS_BETTER = True
INPUT_NAMES = ("src_ids", "tgt_ids")
OUTPUT_NAME = "logits"
FITS_REFERENCE = False
HELDOUT_EXAMPLES = 1000
HELDOUT_SEED = 0
EVAL_BATCH = 250


def dynamic_axes(config: dict) -> dict:
    length = config["max_length"]
    return {"src_ids": {0: ("batch", 1024), 1: ("src_sequence", length)},
            "tgt_ids": {0: ("batch", 1024), 1: ("tgt_sequence", length)}}


def heldout_data(config: dict, limit: int | None = None) -> np.ndarray:
    return reverse_task.heldout_sources(HELDOUT_SEED, limit or HELDOUT_EXAMPLES)


def evaluate(logits_fn, sources: np.ndarray, progress: bool = False) -> float:
    def step(src, tgt):
        return logits_fn({"src_ids": src, "tgt_ids": tgt})

    hits = []
    for start in tqdm(range(0, len(sources), EVAL_BATCH), desc="exact match", disable=not progress, leave=False):
        batch = sources[start : start + EVAL_BATCH]
        hits.append(reverse_task.exact_match(reverse_task.greedy_decode(step, batch), batch))
    return float(np.concatenate(hits).mean())


def evaluate_all(logits_fn, sources: np.ndarray, progress: bool = False) -> dict:
    return {METRIC: evaluate(logits_fn, sources, progress)}


def parity_inputs(sources: np.ndarray) -> dict[str, np.ndarray]:
    """Teacher-forced: the decoder sees BOS + the true reversal (with padding), as in training."""
    src = sources[:64]
    tgt = np.full((len(src), reverse_task.MAX_LENGTH + 1), 0, dtype=np.int64)
    tgt[:, 0] = reverse_task.BOS_ID
    for i, row in enumerate(src):
        body = [t for t in row if t != 0][::-1]
        tgt[i, 1 : 1 + len(body)] = body
    return {"src_ids": np.ascontiguousarray(src), "tgt_ids": tgt}


def benchmark_inputs(config: dict, batch_size: int) -> dict[str, np.ndarray]:
    """One full decoder pass at the longest lengths (src 12, tgt 13)."""
    rng = np.random.default_rng(0)
    src = rng.integers(reverse_task.FIRST_SYMBOL, reverse_task.VOCAB_SIZE, (batch_size, reverse_task.MAX_LENGTH))
    tgt = np.concatenate([np.full((batch_size, 1), reverse_task.BOS_ID), src[:, ::-1]], axis=1)
    return {"src_ids": src.astype(np.int64), "tgt_ids": np.ascontiguousarray(tgt, dtype=np.int64)}


def output_bytes(config: dict, inputs: dict[str, np.ndarray]) -> int:
    """Logits: the symbols' floats per target token."""
    return inputs["tgt_ids"].size * reverse_task.VOCAB_SIZE * logits_budget.FLOAT_BYTES


def calibration_data(config: dict, samples: int, seed: int = 0) -> list[tuple]:
    """Fresh training-distribution batches (teacher-forced), in batches of 16, as model args."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, samples, 16):
        src, tgt_in, _ = reverse_task.training_batch(rng, min(16, samples - start))
        batches.append((src, tgt_in))
    return batches

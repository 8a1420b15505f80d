"""Next-token prediction for Hugging Face decoder LMs on the project's held-out Wikipedia articles
(samples/wiki_corpus.py, the split the GPT samples never trained on), tokenized with the model's own tokenizer:
metric = perplexity per token over non-overlapping windows of `context` tokens."""
import numpy as np

from compressor.tasks.hf_tokenizer import load_tokenizer
from compressor.tasks import language_modeling
from compressor.tasks.language_modeling import benchmark_inputs, output_bytes  # noqa: F401  (the same)
from samples import wiki_corpus

METRIC = "perplexity"
HIGHER_IS_BETTER = False
INPUT_NAMES = ("input_ids",)
OUTPUT_NAME = "logits"
FITS_REFERENCE = False
# windows a batch, fewer where their logits pass compressor.tasks.logits_budget: 4 x 256 x 49,152 fp32 logits
# (SmolLM2) = 201 MB fit its 256 MiB; Qwen2.5's 151,936-token vocabulary takes one window a batch (156 MB)
EVAL_BATCH = 4
PARITY_WINDOWS = 4  # the same


def dynamic_axes(config: dict) -> dict:
    return {"input_ids": {0: ("batch", 1024), 1: ("sequence", config["max_positions"])}}


def _tokens(config: dict, split: str) -> np.ndarray:
    text = wiki_corpus.split_tokens(split).tobytes().decode("utf-8")
    return np.asarray(load_tokenizer(config["tokenizer"])(text)["input_ids"], dtype=np.int64)


def heldout_data(config: dict, limit: int | None = None) -> language_modeling.Windows:
    """[N, context + 1] windows: inputs [:, :-1], targets [:, 1:]; they carry the model's vocabulary size."""
    tokens = _tokens(config, "heldout")
    context = config["context"]
    count = (len(tokens) - 1) // context
    count = min(count, limit) if limit else count
    windows = np.stack([tokens[s : s + context + 1] for s in np.arange(count) * context])
    return language_modeling.as_windows(windows, config.get("vocab_size"))


def evaluate(logits_fn, windows: np.ndarray, progress: bool = False) -> float:
    return language_modeling.evaluate(logits_fn, windows, progress, batch_size=EVAL_BATCH)


def evaluate_all(logits_fn, windows: np.ndarray, progress: bool = False) -> dict:
    return {METRIC: evaluate(logits_fn, windows, progress)}


def parity_inputs(windows: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": np.ascontiguousarray(windows[:language_modeling.window_count(windows, PARITY_WINDOWS), :-1])}


def calibration_data(config: dict, samples: int, seed: int = 0) -> list[tuple]:
    """Random windows of the train split's tokens (never held-out text), in batches of 8, as model args."""
    import torch

    tokens = _tokens(config, "train")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - config["context"], size=samples)
    windows = np.stack([tokens[s : s + config["context"]] for s in starts])
    return [(torch.from_numpy(windows[i : i + 8]),) for i in range(0, samples, 8)]

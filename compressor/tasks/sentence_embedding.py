"""Sentence embeddings of a Hugging Face encoder (mean pooling) on real labelled data: movie-review snippets
with human sentiment scores (samples/movie_reviews.py).

A logistic-regression probe is trained once on the input (fp32) model's embeddings of the train split and then
applied unchanged to every compressed model's embeddings of the held-out split: metric = probe accuracy. The
cosine between each held-out embedding and the fp32 model's is reported beside it."""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from compressor.tasks import logits_budget
from compressor.tasks.hf_tokenizer import load_tokenizer
from compressor.tasks.protocol import UnusableState
from samples import movie_reviews

METRIC = "probe_accuracy"
HIGHER_IS_BETTER = True
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embeddings"
FITS_REFERENCE = True  # the probe
EVAL_BATCH = 64
PROBE_TRAIN_SNIPPETS = 4000  # of 8457: the probe's accuracy saturates well before; fp32 embedding time halves
PROBE_L2 = 1e-3


@dataclass
class EmbeddingData:
    batches: list[dict]  # held-out snippets, tokenized, EVAL_BATCH a batch
    labels: np.ndarray
    config: dict
    probe: np.ndarray | None = None  # [D + 1]: weights and bias, fitted on fp32 train-split embeddings
    reference: np.ndarray | None = None  # fp32 held-out embeddings, for the cosine

    def __len__(self) -> int:
        return len(self.labels)


def dynamic_axes(config: dict) -> dict:
    return {name: {0: ("batch", 1024), 1: ("sequence", config["max_length"])} for name in INPUT_NAMES}


def _tokenize(config: dict, texts: list[str], labels: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Batches of snippets of similar length (little padding), and the labels in batch order."""
    tokenizer = load_tokenizer(config["tokenizer"])
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=config["max_length"])["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(texts), EVAL_BATCH):
        chunk = [texts[i] for i in order[start : start + EVAL_BATCH]]
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=config["max_length"],
                            return_tensors="np")
        batches.append({name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES})
    return batches, labels[order]


def heldout_data(config: dict, limit: int | None = None) -> EmbeddingData:
    texts, labels = movie_reviews.split("heldout")
    return EmbeddingData(*_tokenize(config, texts[:limit], labels[:limit]), config)


def _embed(logits_fn, batches: list[dict], progress: bool, desc: str) -> np.ndarray:
    return np.concatenate([logits_fn(b) for b in tqdm(batches, desc=desc, disable=not progress, leave=False)])


def _fit_probe(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """L2-regularised logistic regression, full-batch L-BFGS in float64: deterministic on the CPU."""
    x = torch.from_numpy(np.concatenate([embeddings, np.ones((len(embeddings), 1))], 1).astype(np.float64))
    y = torch.from_numpy(labels.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + PROBE_L2 * (w[:-1] ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return w.detach().numpy()


def fit_reference(logits_fn, data: EmbeddingData, progress: bool = False) -> None:
    """Called once with the input model: trains the probe on the train split, keeps held-out embeddings."""
    texts, labels = movie_reviews.split("train")
    batches, labels = _tokenize(data.config, texts[:PROBE_TRAIN_SNIPPETS], labels[:PROBE_TRAIN_SNIPPETS])
    data.probe = _fit_probe(_embed(logits_fn, batches, progress, "probe train"), labels)
    data.reference = _embed(logits_fn, data.batches, progress, "fp32 embeddings")


def task_state(data: EmbeddingData) -> dict:
    """What an artifact must carry for `compress check` to score it later: the probe."""
    return {"probe": [float(v) for v in data.probe]}


def restore_state(data: EmbeddingData, state: dict, output_width: int | None = None) -> None:
    probe = np.asarray(state["probe"], dtype=np.float64)
    if probe.ndim != 1 or len(probe) < 2 or not np.isfinite(probe).all() or (
            output_width is not None and len(probe) != output_width + 1):
        raise UnusableState("holds no usable probe (finite weights, one per embedding dimension, and a bias)")
    data.probe = probe


def evaluate_all(logits_fn, data: EmbeddingData, progress: bool = False) -> dict:
    embeddings = _embed(logits_fn, data.batches, progress, "embeddings").astype(np.float64)
    scores = embeddings @ data.probe[:-1] + data.probe[-1]
    metrics = {METRIC: float(((scores > 0) == data.labels.astype(bool)).mean())}
    if data.reference is not None:
        reference = data.reference.astype(np.float64)
        cosine = (embeddings * reference).sum(1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
        metrics["cosine_to_fp32"] = float(cosine.mean())
        metrics["min_cosine_to_fp32"] = float(cosine.min())
    return metrics


def evaluate(logits_fn, data: EmbeddingData, progress: bool = False) -> float:
    return evaluate_all(logits_fn, data, progress)[METRIC]


def parity_inputs(data: EmbeddingData) -> dict[str, np.ndarray]:
    return data.batches[-1]  # the longest snippets, padded to the longest of them: masks are exercised


def benchmark_inputs(config: dict, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    length = min(64, config["max_length"])  # a long review snippet; most are shorter
    vocab = config["vocab_size"]  # skip the low ids: special and unused tokens sit there in BERT vocabularies
    ids = rng.integers(min(1000, vocab // 2), vocab, (batch_size, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def output_bytes(config: dict, inputs: dict[str, np.ndarray]) -> int:
    """One pooled vector a row; its width is not in the config: counted as 8,192 floats, wider than any encoder's."""
    return len(inputs["input_ids"]) * 8192 * logits_budget.FLOAT_BYTES


def calibration_data(config: dict, samples: int, seed: int = 0) -> list[tuple]:
    """Snippets of the train split (never held-out ones), in batches of 16, as model args."""
    texts, _ = movie_reviews.split("train")
    rng = np.random.default_rng(seed)
    chosen = [texts[i] for i in rng.choice(len(texts), size=min(samples, len(texts)), replace=False)]
    tokenizer = load_tokenizer(config["tokenizer"])
    batches = []
    for start in range(0, len(chosen), 16):
        encoded = tokenizer(chosen[start : start + 16], padding=True, truncation=True,
                            max_length=config["max_length"], return_tensors="pt")
        batches.append((encoded["input_ids"].long(), encoded["attention_mask"].long()))
    return batches

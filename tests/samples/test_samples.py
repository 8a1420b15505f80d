"""The shipped samples are trained for real: held-out quality, measured here, not copied from training logs."""
import numpy as np

from compressor.inputs.checkpoint import load_checkpoint
from compressor.tasks import TASKS
from compressor.torch_logits import torch_logits_fn
from samples import reverse_task, wiki_corpus

GPT_FAMILY = ["gpt-xs", "gpt-s", "gpt-m", "gpt-l"]


def _heldout_metric(shipped, name, limit):
    checkpoint = load_checkpoint(shipped / name)
    task = TASKS[checkpoint.family]
    return task.evaluate(torch_logits_fn(checkpoint.model, task.INPUT_NAMES),
                         task.heldout_data(checkpoint.config, limit))


def test_seq2seq_reaches_95_percent_heldout_exact_match(shipped):
    assert _heldout_metric(shipped, "seq2seq-reverse", 1000) >= 0.95  # measured 0.999


def test_gpt_perplexity_falls_with_size(shipped):
    perplexities = [_heldout_metric(shipped, name, 64) for name in GPT_FAMILY]
    assert perplexities == sorted(perplexities, reverse=True), perplexities
    assert perplexities[-1] < 5 < perplexities[0]  # measured on 64 windows: ~10.0 for xs, ~3.8 for l


def test_wiki_split_is_by_article_and_disjoint():
    articles = wiki_corpus.load_articles()
    heldout = [text for i, (_, text) in enumerate(articles) if i % wiki_corpus.HELDOUT_EVERY == 0]
    train_text = bytes(wiki_corpus.split_tokens("train")).decode()
    assert len(articles) > 100
    assert all(text not in train_text for text in heldout[:5])
    assert len(wiki_corpus.split_tokens("heldout")) > 250_000  # ~319K bytes
    windows = wiki_corpus.heldout_windows(128, 4)
    assert windows.shape == (4, 129) and np.array_equal(windows[0, -1], windows[1, 0])


def test_exact_match_scoring():
    src = reverse_task.pad([[3, 4, 5], [6]], reverse_task.MAX_LENGTH)
    predicted = np.array([[5, 4, 3, reverse_task.EOS_ID, 9], [6, 7, reverse_task.EOS_ID, 0, 0]])
    assert reverse_task.exact_match(predicted, src).tolist() == [True, False]

"""Validation's memory follows the logits budget (compressor.tasks.logits_budget), not the vocabulary: evaluation
batches, parity windows and latency batch sizes shrink for large vocabularies, one ONNX Runtime session is alive
at a time, and the figures of small vocabularies stay what they were."""
import pickle
import shutil
import tracemalloc
import weakref

import numpy as np
import pytest

import compressor.validate as validate_module
from compressor.tasks import TASKS, hf_language_modeling, language_modeling, logits_budget
from compressor.tasks.language_modeling import Windows, as_windows
from compressor.validate import SKIPPED_BATCHES, benchmark_batches, parity

QWEN_VOCAB = 151_936
SMOLLM2_VOCAB = 49_152


def _windows(count: int, context: int, vocab: int | None) -> Windows:
    rng = np.random.default_rng(0)
    return as_windows(rng.integers(0, min(vocab or 256, 1000), (count, context + 1)), vocab)


def test_windows_keep_their_vocabulary_through_slices_and_pickles_but_not_arithmetic():
    windows = _windows(6, 8, QWEN_VOCAB)
    assert windows[2:4].vocab_size == windows[:, :-1].vocab_size == QWEN_VOCAB
    assert pickle.loads(pickle.dumps(windows)).vocab_size == QWEN_VOCAB
    assert type(windows + 1) is np.ndarray and type(windows.sum()) is not Windows
    assert type(np.ascontiguousarray(windows[:2, :-1])) is np.ndarray  # what feeds ONNX Runtime and torch
    assert as_windows(windows, 0).vocab_size is None  # a config without a vocabulary: no limit, as before


def test_small_vocabularies_keep_their_batches_and_large_ones_shrink_to_the_budget():
    hf, gpt = TASKS["hf-causal-lm"], TASKS["gpt"]
    assert hf is hf_language_modeling and gpt is language_modeling
    # SmolLM2 (4 x 256 x 49,152 fp32 = 201 MB) and the GPT samples (bytes) keep theirs under 256 MiB
    assert len(hf.parity_inputs(_windows(8, 256, SMOLLM2_VOCAB))["input_ids"]) == 4
    assert language_modeling.window_count(_windows(8, 256, SMOLLM2_VOCAB), hf.EVAL_BATCH) == 4
    assert len(gpt.parity_inputs(_windows(20, 128, 256))["input_ids"]) == 16
    assert language_modeling.window_count(_windows(40, 1024, 256), gpt.EVAL_BATCH) == 32
    # Qwen2.5's vocabulary: one 256-token window (156 MB) a batch, and one parity window
    assert len(hf.parity_inputs(_windows(8, 256, QWEN_VOCAB))["input_ids"]) == 1
    assert language_modeling.window_count(_windows(8, 256, QWEN_VOCAB), hf.EVAL_BATCH) == 1
    assert len(hf.parity_inputs(_windows(8, 256, None))["input_ids"]) == 4  # unknown vocabulary: as before


def test_latency_batches_over_the_budget_are_skipped_and_said_why():
    qwen = {"context": 256, "vocab_size": QWEN_VOCAB}
    batches, skipped = benchmark_batches(TASKS["hf-causal-lm"], qwen)
    assert batches == [1] and list(skipped) == ["batch16"]
    assert "2,374 MiB" in skipped["batch16"] and "256 MiB logits budget" in skipped["batch16"]
    assert benchmark_batches(TASKS["gpt"], {"context": 128, "vocab_size": 256}) == ([1, 16], {})
    assert benchmark_batches(TASKS["seq2seq"], {}) == ([1, 16], {})
    assert benchmark_batches(TASKS["hf-encoder"], {"max_length": 128, "vocab_size": 30522}) == ([1, 16], {})


def test_batch_one_runs_even_over_the_budget(monkeypatch):
    monkeypatch.setattr(logits_budget, "LOGITS_BUDGET_BYTES", 1)
    assert benchmark_batches(TASKS["gpt"], {"context": 128, "vocab_size": 256})[0] == [1]
    assert len(TASKS["gpt"].parity_inputs(_windows(20, 128, 256))["input_ids"]) == 1


def _logits_of(vocab: int, calls: list):
    def logits_fn(inputs: dict) -> np.ndarray:
        ids = inputs["input_ids"]
        calls.append(len(ids))
        logits = np.empty((*ids.shape, vocab), np.float32)
        for row, window in zip(logits, ids):  # each window's logits its own, whatever the batch
            np.random.default_rng([int(t) for t in window]).standard_normal(row.shape, np.float32, out=row)
        return logits

    return logits_fn


def test_perplexity_does_not_depend_on_the_chunks_and_small_vocabularies_keep_their_figures(monkeypatch):
    windows, calls = _windows(6, 32, 5000), []
    before = language_modeling.evaluate(_logits_of(5000, calls), windows, batch_size=4)
    assert calls == [4, 2]
    # a budget of 2.5 windows: batches of 2, and float64 scratch of one position at a time
    monkeypatch.setattr(logits_budget, "LOGITS_BUDGET_BYTES", 5 * 32 * 5000 * 4 // 2)
    calls.clear()
    after = language_modeling.evaluate(_logits_of(5000, calls), windows, batch_size=4)
    assert calls == [2, 2, 2]
    assert after == pytest.approx(before, rel=1e-12)  # only the order of the batches' sums differs
    reference = _logits_of(5000, [])({"input_ids": windows[:3, :-1]})
    candidate = reference + np.float32(1e-3) * reference[::-1]
    chunked = parity(reference, candidate, 1e-2)
    monkeypatch.setattr(logits_budget, "LOGITS_BUDGET_BYTES", 256 << 20)
    assert parity(reference, candidate, 1e-2) == chunked  # maxima: the same figures bit for bit


def test_an_evaluation_of_a_large_vocabulary_stays_within_the_budget(monkeypatch):
    """numpy's allocations, traced: the logits of one batch and the float64 scratch, never a batch in float64
    (before: 4 windows of logits and three float64 copies of a window, 6x the budget here)."""
    context, windows = 64, _windows(4, 64, QWEN_VOCAB)
    window_bytes = context * QWEN_VOCAB * 4  # 38.9 MB
    monkeypatch.setattr(logits_budget, "LOGITS_BUDGET_BYTES", window_bytes * 3 // 2)
    logits_fn = _logits_of(QWEN_VOCAB, calls := [])
    tracemalloc.start()
    try:
        language_modeling.evaluate(logits_fn, windows, batch_size=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calls == [1, 1, 1, 1]
    assert peak < window_bytes + 4 * logits_budget.LOGITS_BUDGET_BYTES // 16 + (4 << 20), peak


def _large_vocabulary_llama(folder, tokenizer_from, vocab: int):
    """A 2-layer Llama of width 96 (no KV cache export: quick) with a Qwen-sized vocabulary over a small BPE
    tokenizer (as Qwen2.5 pads its table past its tokenizer), 64 positions."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder.mkdir()
    for name in tokenizer_from.iterdir():
        if "token" in name.name or name.name == "special_tokens_map.json":
            shutil.copy(name, folder / name.name)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=192, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def test_a_large_vocabulary_is_validated_within_the_budget_one_session_at_a_time(tmp_path, monkeypatch, tiny_llama):
    from compressor.pipeline import RunOptions, run
    from compressor.validate import BenchmarkSettings, run_benchmark

    folder = _large_vocabulary_llama(tmp_path / "llama", tiny_llama, QWEN_VOCAB)
    window_bytes = 64 * QWEN_VOCAB * 4
    monkeypatch.setattr(logits_budget, "LOGITS_BUDGET_BYTES", window_bytes * 5 // 2)  # two windows a batch
    sessions, alive_at_creation, batches = [], [], []
    create, make_logits_fn = validate_module.create_session, validate_module.logits_fn

    def counted_session(*args, **kwargs):
        alive_at_creation.append(sum(ref() is not None for ref in sessions))
        session = create(*args, **kwargs)
        sessions.append(weakref.ref(session))
        return session

    def recorded_logits_fn(session):
        inner = make_logits_fn(session)
        return lambda inputs: batches.append(len(inputs["input_ids"])) or inner(inputs)

    monkeypatch.setattr(validate_module, "create_session", counted_session)
    monkeypatch.setattr(validate_module, "logits_fn", recorded_logits_fn)
    # no benchmark here (it would export the input model as well): the latency child is run on its own below
    options = RunOptions(recipe="int4", eval_limit=5, bench=None, progress=False)
    report = run(folder, tmp_path / "out", options, log=lambda _: None)
    assert alive_at_creation == [0, 0]  # the default session, then the exact one, never both
    assert batches == [2, 2, 1, 2, 2]  # 5 windows scored 2 at a time; parity on 2 windows, in each session
    assert report["accuracy"]["heldout_examples"] == 5 and report["parity"]["passed"]
    assert set(report["parity"]["by_provider"]) == {"cpu", "cpu_exact"}
    config = {"context": 64, "vocab_size": QWEN_VOCAB}
    latency = run_benchmark(tmp_path / "out" / "model.onnx", TASKS["hf-causal-lm"], config, "cpu",
                            BenchmarkSettings(warmup=1, runs=1))
    assert latency["batch1"]["runs"] == 1 and "batch16" not in latency
    assert "594 MiB, over the 93 MiB logits budget" in latency[SKIPPED_BATCHES]["batch16"]

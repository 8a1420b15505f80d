"""Seeded, deterministic training of the sample Transformers (`compress sample train`)."""
import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compressor.inputs.checkpoint import save_checkpoint
from samples import reverse_task
from samples.registry import SAMPLES, SampleSpec, build_model, corpus_module, count_params
from samples.seq2seq import PAD_ID

EVAL_WINDOWS = 256  # wiki held-out windows scored at the end of training (`compress run` scores the full split)


def _learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _gpt_batches(spec: SampleSpec, rng: np.random.Generator, device: torch.device):
    tokens = torch.from_numpy(np.array(corpus_module(spec.config.corpus).split_tokens("train"))).to(device)
    span = spec.config.context + 1
    offsets = torch.arange(span, device=device)
    while True:
        starts = torch.from_numpy(rng.integers(0, len(tokens) - span, size=spec.batch_size)).to(device)
        window = tokens[starts[:, None] + offsets].long()
        yield (window[:, :-1],), window[:, 1:]


def _seq2seq_batches(spec: SampleSpec, rng: np.random.Generator, device: torch.device):
    while True:
        src, tgt_in, labels = reverse_task.training_batch(rng, spec.batch_size)
        yield (src.to(device), tgt_in.to(device)), labels.to(device)


@torch.no_grad()
def _heldout_metric(spec: SampleSpec, model: torch.nn.Module, seed: int, device: torch.device) -> dict:
    model.eval()
    if spec.family == "gpt":  # the text corpus's held-out split is scored whole: it is what the family reports
        whole = spec.config.corpus == "text"
        corpus = corpus_module(spec.config.corpus)
        windows = torch.from_numpy(corpus.heldout_windows(spec.config.context, None if whole else EVAL_WINDOWS))
        losses = [F.cross_entropy(model(w[:, :-1]).float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
                  for w in windows.to(device).split(64)]
        key = "heldout_perplexity" if whole else "heldout_perplexity_subset"
        return {key: math.exp(float(torch.stack(losses).sum()) / windows[:, 1:].numel()),
                "heldout_windows": int(len(windows))}
    src = reverse_task.heldout_sources(seed, 1000)

    def logits_fn(s, t):
        return model(torch.from_numpy(s).to(device), torch.from_numpy(t).to(device)).float().cpu().numpy()

    hits = reverse_task.exact_match(reverse_task.greedy_decode(logits_fn, src), src)
    return {"heldout_exact_match": float(hits.mean()), "heldout_examples": int(len(src))}


def train_sample(name: str, out: Path, seed: int = 0, steps: int | None = None, device: str = "cpu",
                 stored_dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Train sample `name` and write its checkpoint to `out`; returns the training record."""
    spec = SAMPLES[name]
    steps = steps or spec.steps
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    model = build_model(spec.family, spec.config.to_dict()).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    batches = _gpt_batches(spec, rng, dev) if spec.family == "gpt" else _seq2seq_batches(spec, rng, dev)
    started = time.perf_counter()
    model.train()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if spec.mixed_precision and dev.type == "cuda"
                else contextlib.nullcontext())
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress, mininterval=0.5)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, spec.learning_rate)
        inputs, labels = next(batches)
        with autocast:
            logits = model(*inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=PAD_ID
                               if spec.family == "seq2seq" else -100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    record = {
        "seed": seed, "steps": steps, "batch_size": spec.batch_size, "learning_rate": spec.learning_rate,
        "final_train_loss": round(float(loss.item()), 4), "params": count_params(model),
        "train_seconds": round(time.perf_counter() - started, 1), "device": dev.type,
        **({"precision": "bf16 autocast"} if spec.mixed_precision and dev.type == "cuda" else {}),
        **_heldout_metric(spec, model, seed, dev),
    }
    if spec.family == "gpt":
        record["corpus"] = corpus_module(spec.config.corpus).describe()
    save_checkpoint(out, name, spec.family, model.cpu(), extra={"training": record}, dtype=stored_dtype)
    return record

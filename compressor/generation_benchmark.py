"""Prefill latency, decode speed and peak memory of a decoder artifact, in a child process of its own so the
peak RSS is the ONNX Runtime deployment's (python + onnxruntime + session + cache), not the caller's.

Usage (internal): python -m compressor.generation_benchmark MODEL.onnx --provider cpu --prompt-tokens 128
--new-tokens 128 --runs 3. A seeded random prompt, greedy decoding of exactly the asked number of tokens (no
stop token), the first run discarded as warm-up; medians over the rest. Where prompt + new tokens exceed the
artifact's position limit both are scaled down to fit, and the figures say so. Prints one JSON object.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from compressor.errors import UserError
from compressor.ort_benchmark import PROGRESS_LINE, peak_rss_bytes


MIN_NEW_TOKENS = 2  # the first new token is the prefill's; decode speed needs one more at least


def fit_lengths(prompt_tokens: int, new_tokens: int, limit: int | None) -> tuple[int, int]:
    """Prompt and new tokens scaled down together to fit `limit` positions, keeping a prompt token and
    MIN_NEW_TOKENS new ones."""
    if limit is None or prompt_tokens + new_tokens <= limit:
        return prompt_tokens, new_tokens
    if limit < 1 + MIN_NEW_TOKENS:
        raise UserError(f"the model takes {limit} positions in all: too few to time a prompt and "
                        f"{MIN_NEW_TOKENS} new tokens")
    scale = limit / (prompt_tokens + new_tokens)
    prompt = min(max(1, int(prompt_tokens * scale)), limit - MIN_NEW_TOKENS)
    return prompt, limit - prompt


def benchmark(model_path: str, provider: str, prompt_tokens: int, new_tokens: int, runs: int,
              threads: int | None, progress: bool = False) -> dict:
    from compressor.generation import generate, read_graph_limits
    from compressor.kv_cache import genai_head_size, keeps_cache_in_place
    from compressor.ort_runtime import create_session

    baseline = peak_rss_bytes()
    limits = read_graph_limits(model_path)  # before the session: the graph read is not the deployment's memory
    session = create_session(model_path, provider, threads)
    prompt_tokens, new_tokens = fit_lengths(prompt_tokens, new_tokens, limits.positions)
    vocab = limits.vocab or int(session.get_outputs()[0].shape[-1])  # no table, symbolic logits: as it was
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist()
    head_size = genai_head_size(Path(model_path).parent)
    in_place = keeps_cache_in_place(session, Path(model_path).parent)
    prefill, decode = [], []
    for run in range(runs + 1):
        result = generate(session, prompt, new_tokens, provider, head_size=head_size, in_place=in_place,
                          limits=limits)
        if run:  # the first run warms up (allocations, kernel choice)
            prefill.append(result.prefill_ms)
            decode.append(result.decode_tokens_per_s)
        if progress:
            print(PROGRESS_LINE, file=sys.stderr, flush=True)
    return {"provider": provider, "threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "runs": runs, "cache_in_place": in_place, "prefill_ms": round(statistics.median(prefill), 3),
            "decode_tokens_per_s": round(statistics.median(decode), 2),
            "decode_ms_per_token": round(1e3 / statistics.median(decode), 3),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "rss_baseline_mb": round(baseline / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    try:
        result = benchmark(args.model, args.provider, args.prompt_tokens, args.new_tokens, args.runs, args.threads,
                           args.progress)
    except UserError as exc:  # its one line is the last the caller reads (compressor.validate._run_child)
        print(exc, file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

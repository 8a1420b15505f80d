"""llama.cpp (llama-cpp-python, the `bench` extra) on a GGUF file, with the same protocol and JSON keys as
compressor.generation_benchmark: a seeded random prompt, greedy decoding of exactly the asked number of tokens,
the first run discarded, medians of the rest, peak RSS of this process.

    python benchmarks/llama_cpp_generation.py MODEL.gguf --threads 2 --prompt-tokens 128 --new-tokens 128 --runs 3
    python benchmarks/llama_cpp_generation.py MODEL.gguf --perplexity WINDOWS.npy   # {"perplexity": ...}

--perplexity scores [N, context + 1] token windows (inputs [:, :-1], targets [:, 1:]; the same windows and
token ids as compressor.tasks.hf_language_modeling, whose tokenizer transformers reads from the same GGUF).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.ort_benchmark import peak_rss_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--provider", default="cpu")  # accepted for the harness; llama.cpp runs on the CPU here
    parser.add_argument("--perplexity", help="a .npy file of token windows to score instead of timing")
    args = parser.parse_args()
    from llama_cpp import Llama

    if args.perplexity:
        print(json.dumps({"perplexity": _perplexity(Llama, args.model, np.load(args.perplexity), args.threads)}))
        return

    llm = Llama(model_path=args.model, n_threads=args.threads, n_ctx=args.prompt_tokens + args.new_tokens + 8,
                verbose=False, logits_all=False)
    prompt = np.random.default_rng(0).integers(0, llm.n_vocab(), args.prompt_tokens).tolist()
    prefill, decode = [], []
    for run in range(args.runs + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        end = time.perf_counter()
        if run:
            prefill.append((first - start) * 1e3)
            decode.append((args.new_tokens - 1) / (end - first))
    print(json.dumps({"provider": "cpu (llama.cpp)", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "runs": args.runs,
                      "prefill_ms": round(statistics.median(prefill), 3),
                      "decode_tokens_per_s": round(statistics.median(decode), 2),
                      "decode_ms_per_token": round(1e3 / statistics.median(decode), 3),
                      "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)}))


def _perplexity(llama_class, model: str, windows: np.ndarray, threads: int) -> float:
    """exp(mean next-token NLL) over all windows' targets, every position scored (logits_all)."""
    llm = llama_class(model_path=model, n_threads=threads, n_ctx=windows.shape[1] + 8, n_batch=windows.shape[1],
                      verbose=False, logits_all=True)
    nll, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window[:-1].tolist())
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return float(np.exp(nll / count))


if __name__ == "__main__":
    main()

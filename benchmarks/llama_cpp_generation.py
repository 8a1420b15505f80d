"""llama.cpp (llama-cpp-python, the `bench` extra) on a GGUF file, with the same protocol and JSON keys as
compressor.generation_benchmark: a seeded random prompt, greedy decoding of exactly the asked number of tokens,
the first run discarded, medians of the rest, peak RSS of this process.

    python benchmarks/llama_cpp_generation.py MODEL.gguf --threads 2 --prompt-tokens 128 --new-tokens 128 --runs 3
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
    args = parser.parse_args()
    from llama_cpp import Llama

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


if __name__ == "__main__":
    main()

"""ONNX Runtime GenAI's own loop on artifact folders (ours and Model Builder's) on the CPU, interleaved: a seeded
random 128-token prompt, 128 greedy new tokens (min_length forces them all), 2 intra-op threads, first run
discarded, medians of the rest.

    python benchmarks/genai_cpu_generation.py ours=runs/smol mb=mb/int4 [--threads 2] [--runs 3] [--rounds 2]
"""
import argparse
import json
import statistics
import time

import numpy as np


def measure(folder: str, threads: int, runs: int, prompt_tokens: int = 128, new_tokens: int = 128) -> dict:
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return timed_generation(og, og.Model(config), folder, runs, prompt_tokens, new_tokens)


def timed_generation(og, model, folder: str, runs: int, prompt_tokens: int = 128, new_tokens: int = 128) -> dict:
    """GenAI's loop on `model` (an og.Model of `folder`): a seeded random prompt, exactly `new_tokens` greedy
    tokens, runs + 1 times; the first discarded, medians of the rest."""
    vocab = json.load(open(f"{folder}/genai_config.json"))["model"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens).astype(np.int32)
    prefill, decode = [], []
    for run in range(runs + 1):
        params = og.GeneratorParams(model)
        total = prompt_tokens + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt[None])
        generator.generate_next_token()
        first, count = time.perf_counter(), 1
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        end = time.perf_counter()
        if run:
            prefill.append((first - start) * 1e3)
            decode.append((count - 1) / (end - first))
    return {"prefill_ms": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "new_tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="label=folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    results = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, folder in models.items():
            results[label].append(measure(folder, args.threads, args.runs))
    for label, rows in results.items():
        print(f"{label}: prefill {statistics.median(r['prefill_ms'] for r in rows):.1f} ms, decode "
              f"{statistics.median(r['decode_tokens_per_s'] for r in rows):.1f} tok/s ({rows[0]['new_tokens']} new)")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

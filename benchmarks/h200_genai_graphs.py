"""On the lent GPU machine: ONNX Runtime GenAI on artifact folders (ours and Model Builder's) with past/present
sharing one buffer, with and without CUDA graphs; 128-token prompt, 128 greedy new tokens, first run discarded,
medians of 3 per round; the folders take turns for ROUNDS rounds (default 3) and the medians over rounds are
reported. MODELS=/tmp/gpu/models ROUNDS=3 python3 benchmarks/h200_genai_graphs.py ours mb"""
import json
import os
import statistics
import sys

import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu links against)
import onnxruntime_genai as og

from genai_cpu_generation import timed_generation  # beside this script: the same timed loop as on the CPU

OUT = os.environ.get("OUT", "/tmp/out")
ROOT = os.environ.get("MODELS", "/tmp/gpu/models")
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def measure(name: str, graph: str) -> dict:
    config = og.Config(f"{ROOT}/{name}")
    config.clear_providers()
    config.append_provider("cuda")
    config.set_provider_option("cuda", "enable_cuda_graph", graph)
    config.overlay(json.dumps({"search": {"past_present_share_buffer": True, "max_length": 256}}))
    result = timed_generation(og, og.Model(config), f"{ROOT}/{name}", runs=3)
    return {key: result[key] for key in ("prefill_ms", "decode_tokens_per_s")}


def main() -> None:
    rounds: dict[str, list] = {}
    for round_index in range(ROUNDS):
        for name in sys.argv[1:]:
            for graph in ("0", "1"):
                key = f"{name} share=True cuda_graph={graph}"
                try:
                    result = measure(name, graph)
                except Exception as exc:  # a folder GenAI refuses: say so in the results
                    result = {"error": str(exc)[:300]}
                rounds.setdefault(key, []).append(result)
                print(round_index, key, result, flush=True)
    summary = {key: {"rounds": runs, **({k: statistics.median(r[k] for r in runs)
                                          for k in ("prefill_ms", "decode_tokens_per_s")}
                                         if all("error" not in r for r in runs) else {})}
               for key, runs in rounds.items()}
    json.dump(summary, open(f"{OUT}/cuda_graph.json", "w"), indent=1)
    print(json.dumps({k: v.get("decode_tokens_per_s") for k, v in summary.items()}))


if __name__ == "__main__":
    main()

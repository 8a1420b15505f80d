"""On the lent GPU machine: ONNX Runtime GenAI on two artifact folders (ours and Model Builder's) with
past/present sharing one buffer, with and without CUDA graphs; 128-token prompt, 128 greedy new tokens, first
run discarded, medians of 3. MODELS=/tmp/gpu/models python3 benchmarks/h200_genai_graphs.py ours mb"""
import sys
import json, os, statistics, time, numpy as np, torch  # noqa
import onnxruntime_genai as og
OUT = os.environ.get("OUT", "/tmp/out"); res = {}
root = os.environ.get("MODELS", "/tmp/gpu/models")
for name in sys.argv[1:]:
    for share, graph in ((True, "0"), (True, "1")):
        key = f"{name} share={share} cuda_graph={graph}"
        try:
            config = og.Config(f"{root}/{name}"); config.clear_providers(); config.append_provider("cuda")
            config.set_provider_option("cuda", "enable_cuda_graph", graph)
            config.overlay(json.dumps({"search": {"past_present_share_buffer": share, "max_length": 256}}))
            model = og.Model(config)
            prompt = np.random.default_rng(0).integers(0, 49152, 128).astype(np.int32)
            times = []
            for run in range(4):
                params = og.GeneratorParams(model); params.set_search_options(max_length=256, min_length=256, do_sample=False)
                gen = og.Generator(model, params)
                t0 = time.perf_counter(); gen.append_tokens(prompt[None]); gen.generate_next_token(); t1 = time.perf_counter(); n = 1
                while not gen.is_done():
                    gen.generate_next_token(); n += 1
                t2 = time.perf_counter()
                if run: times.append(((t1 - t0) * 1e3, (n - 1) / (t2 - t1)))
            res[key] = {"prefill_ms": statistics.median(t[0] for t in times), "decode_tokens_per_s": statistics.median(t[1] for t in times)}
        except Exception as exc:
            res[key] = {"error": str(exc)[:300]}
        print(key, res[key], flush=True)
json.dump(res, open(f"{OUT}/cuda_graph.json", "w"), indent=1)

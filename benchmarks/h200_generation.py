"""On the lent GPU machine (see DEVELOPERS guide: onnxruntime-gpu and onnxruntime-genai-cuda installed under
PYTHONPATH): generation speed on the CUDA EP through compressor.generation_benchmark (our loop, I/O binding),
interleaved over 2 rounds; then ONNX Runtime GenAI's own loop on two artifact folders, and token identity of
its greedy output with our loop on the first.

    MODELS=/tmp/gpu/models python3 benchmarks/h200_generation.py gptl-int4,gptl-fp16,smol,mb smol,mb

Folders are MODELS/NAME (each with model.onnx, genai_config.json). Writes $OUT/cuda_generation.json and
$OUT/cuda_genai.json; results of the 2026-12-01 run are in benchmarks/results/h200/."""
import json, os, subprocess, sys, statistics, time
import numpy as np
OUT = os.environ.get("OUT", "/tmp/out")
root = os.environ.get("MODELS", "/tmp/gpu/models")
models = {name: f"{root}/{name}/model.onnx" for name in sys.argv[1].split(",")}
results = {name: [] for name in models}
for rnd in range(2):
    for name, path in models.items():
        cmd = [sys.executable, "-m", "compressor.generation_benchmark", path, "--provider", "cuda",
               "--prompt-tokens", "128", "--new-tokens", "128", "--runs", "5"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(name, "FAILED", done.stderr[-1500:]); continue
        r = json.loads(done.stdout.strip().splitlines()[-1]); results[name].append(r)
        print(rnd, name, r["prefill_ms"], r["decode_tokens_per_s"], r["peak_rss_mb"], flush=True)
summary = {n: {k: statistics.median(x[k] for x in rs) for k in ("prefill_ms", "decode_tokens_per_s")} for n, rs in results.items() if rs}
print(json.dumps(summary, indent=1))
json.dump({"runs": results, "summary": summary}, open(f"{OUT}/cuda_generation.json", "w"), indent=1)
# GenAI on CUDA: our folder and Model Builder's, greedy 128 after 128; and token identity with our loop
import torch  # noqa
import onnxruntime_genai as og
from compressor.generation import generate
from compressor.ort_runtime import create_session
genai = {}
for name in sys.argv[2].split(","):
    folder = f"{root}/{name}"
    config = og.Config(folder); config.clear_providers(); config.append_provider("cuda")
    model = og.Model(config)
    prompt = np.random.default_rng(0).integers(0, 49152, 128).astype(np.int32)
    times, tokens = [], None
    for run in range(4):
        params = og.GeneratorParams(model); params.set_search_options(max_length=256, min_length=256, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter(); gen.append_tokens(prompt[None]); gen.generate_next_token(); t1 = time.perf_counter()
        out = [int(gen.get_next_tokens()[0])]
        while not gen.is_done():
            gen.generate_next_token(); out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        if run: times.append(((t1 - t0) * 1e3, (len(out) - 1) / (t2 - t1)))
        tokens = out
    genai[name] = {"prefill_ms": statistics.median(t[0] for t in times), "decode_tokens_per_s": statistics.median(t[1] for t in times), "new_tokens": len(tokens)}
    if name.startswith("smol"):
        ours = generate(create_session(f"{folder}/model.onnx", "cuda"), prompt.tolist(), 32, "cuda").tokens
        genai[name]["first_32_identical_to_our_loop"] = ours == tokens[:32]
        genai[name]["agree_prefix"] = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), 32)
    print(name, genai[name], flush=True)
json.dump(genai, open(f"{OUT}/cuda_genai.json", "w"), indent=1)

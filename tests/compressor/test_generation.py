"""Decoder artifacts that generate: the report's generation figures beside the input's fp32 export,
`compress generate` and `compress bench` through the console script, and the artifact folder under ONNX Runtime
GenAI (token-identical to our own loop)."""
import json

import numpy as np
import pytest

FAST = ("--eval-limit", "8", "--bench-runs", "2", "--quiet")
NO_BENCH = ("--eval-limit", "8", "--no-bench", "--quiet")  # for tests that read no speed figure


@pytest.fixture(scope="module")
def gpt_int4(shared_run):
    """gpt-xs int4 with its generation benchmark (test_plots reads the same run)."""
    return shared_run("gpt-xs int4").out


def test_report_measures_generation_against_the_fp32_export(gpt_int4):
    report = json.loads((gpt_int4 / "report.json").read_text())
    generation = report["generation"]["cpu"]
    for name in ("artifact", "input"):
        figures = generation[name]
        assert figures["prefill_ms"] > 0 and figures["decode_tokens_per_s"] > 0 and figures["peak_rss_mb"] > 0
        assert figures["prompt_tokens"] + figures["new_tokens"] <= 128  # gpt-xs's position table
        assert figures["cache_in_place"] is True  # both timed alike: the fp32 export keeps its cache in place too
    assert generation["speedup"]["decode"] == pytest.approx(
        generation["artifact"]["decode_tokens_per_s"] / generation["input"]["decode_tokens_per_s"])
    assert report["summary"]["speedup"]["cpu"] == generation["speedup"]
    decode = report["parity"]["by_provider"]["cpu_decode"]  # the cache path, exact kernels, fp32 tolerance
    assert decode["passed"] and decode["tolerance_max_rel"] == 1e-4
    assert "## Generation, ONNX Runtime cpu" in (gpt_int4 / "report.md").read_text()


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}], ids=["greedy", "sampled"])
def test_cache_kept_in_place_gives_the_same_tokens_as_the_copied_one(gpt_int4, sampling):
    """One bound buffer per layer (GroupQueryAttention writes into it) against each step's presents fed back:
    token for token the same, greedy and sampled (sampling reads the whole distribution, not just its top)."""
    from compressor.generation import Sampling, generate
    from compressor.kv_cache import keeps_cache_in_place
    from compressor.ort_runtime import create_session

    session = create_session(gpt_int4 / "model.onnx")
    assert keeps_cache_in_place(session)  # the export says so in its metadata
    prompt = [84, 104, 101, 32, 99, 105, 116, 121]
    runs = [generate(session, prompt, 100, sampling=Sampling(**sampling), in_place=in_place).tokens
            for in_place in (False, True, True)]
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 100  # a second in-place run starts from a clean buffer


def test_generate_streams_a_continuation(compress, compress_here, gpt_int4):
    done = compress("generate", str(gpt_int4), "--prompt", "The city of ", "--max-new-tokens", "20", "--stats")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The city of ") and len(done.stdout) > len("The city of ") + 5
    assert "tokens/s" in done.stderr
    sampled = [compress_here("generate", str(gpt_int4), "--prompt", "The ", "--temperature", "1", "--top-p", "0.9",
                             "--seed", str(seed), "--max-new-tokens", "20").stdout for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling: same seed, same text


def test_bench_json(compress, gpt_int4):
    done = compress("bench", str(gpt_int4), "--json", "--runs", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["provider"] == "cpu" and result["runs"] == 2
    for key in ("decode_tokens_per_s", "prefill_ms", "peak_rss_mb"):
        assert result[key] > 0


@pytest.mark.parametrize("args, message", [
    (("--prompt", "x", "--top-p", "0"), "--top-p must be in (0, 1]"),
    (("--prompt", "x", "--temperature", "-1"), "--temperature must be"),
    (("--prompt", "x" * 200), "the prompt has 200 tokens; this model takes at most 128"),
])
def test_bad_generate_arguments_are_one_line(compress_here, gpt_int4, args, message):
    done = compress_here("generate", str(gpt_int4), *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_hf_decoder_folder_runs_under_onnxruntime_genai(compress_here, make_tiny_llama, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from compressor.generation import generate
    from compressor.ort_runtime import create_session

    out = tmp_path / "o"
    llama = make_tiny_llama(tmp_path / "llama", 128)  # heads of 32
    done = compress_here("run", str(llama), "--recipe", "int4", "--set", "quantize.block_size=32", "--out",
                         str(out), *NO_BENCH)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert (config["decoder"]["num_hidden_layers"], config["decoder"]["num_key_value_heads"]) == (2, 2)
    assert (out / "tokenizer.json").is_file()
    prompt = [5, 17, 42, 99, 7]
    session = create_session(out / "model.onnx")
    ours = generate(session, prompt, 16).tokens
    assert generate(session, prompt, 16, in_place=True).tokens == ours  # rotary inside GroupQueryAttention too
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours[:len(theirs)] and len(theirs) == 16


def test_heads_gqa_cannot_take_export_without_a_cache_and_generate_refuses_it(compress_here, tiny_llama, tmp_path):
    import onnx

    done = compress_here("run", str(tiny_llama), "--out", str(tmp_path / "o"), *FAST)  # heads of 24
    assert done.returncode == 0, done.stderr
    inputs = [i.name for i in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.input]
    assert inputs == ["input_ids"]
    assert "generation" not in json.loads((tmp_path / "o" / "report.json").read_text())
    refused = compress_here("generate", str(tmp_path / "o"), "--prompt", "abc")  # as any encoder or seq2seq artifact
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "has no KV cache" in refused.stderr
    bench = compress_here("bench", str(tmp_path / "o"), "--json", "--runs", "2")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["batch1"]["p50_ms"] > 0  # no cache: batch latency instead
    missing = compress_here("bench", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no artifact at" in missing.stderr


def test_float16_export_for_cuda(compress_here, gpt_int4, tmp_path):
    import onnx

    out = tmp_path / "f16"
    done = compress_here("run", "gpt-xs", "--recipe", "int4", "--set", "export.dtype=float16", "--out", str(out),
                         *NO_BENCH)
    assert done.returncode == 0, done.stderr
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    assert {p.key: p.value for p in model.metadata_props}["compressor.kv_cache"] == "in_place"
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = json.loads((out / "report.json").read_text())
    fp32 = json.loads((gpt_int4 / "report.json").read_text())
    assert report["recipe"]["export"] == {"dtype": "float16"}
    # the same codes, with scales and every other parameter at 16 bits instead of 32
    assert report["passes"][0]["unquantized_bits_per_param"] == 16
    assert report["total_model_bits"] < fp32["total_model_bits"]
    by_provider = report["parity"]["by_provider"]
    assert by_provider["cpu_exact"]["passed"] and by_provider["cpu_decode"]["passed"]
    assert by_provider["cpu_exact"]["tolerance_max_rel"] == 1e-2  # float16 activations (validate.Tolerances)
    assert report["accuracy"]["agreement"]["cpu"]["passed"]

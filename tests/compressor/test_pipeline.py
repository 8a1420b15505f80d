"""The one pipeline end to end on the shipped gpt-xs: graph passes after lowering, the whole chain of torch
passes, the speed-up gate, and the summary block every report opens with."""
import json

import onnx
import pytest

FAST = ("--eval-limit", "8", "--bench-runs", "3", "--quiet")
NO_BENCH = ("--eval-limit", "8", "--no-bench", "--quiet")  # for tests that read no speed figure


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_int4_fused_lowers_then_fuses(compress_here, tmp_path, optimized_ops):
    done = compress_here("run", "gpt-xs", "--recipe", "int4-fused", "--out", str(tmp_path / "o"), *NO_BENCH)
    assert done.returncode == 0, done.stderr
    report = _report(tmp_path / "o")
    assert [p["name"] for p in report["passes"]] == ["quantize", "fuse"]
    fuse = report["passes"][1]
    # the KV-cache decoder graph is written fused (exporters.decoder_graph): nothing is left for the rewriter
    assert fuse["fusions"] == {}
    assert fuse["nodes"]["after"] == fuse["nodes"]["before"]
    assert fuse["perplexity"] == report["accuracy"]["onnxruntime"]["cpu"]  # scored on the artifact itself
    assert fuse["total_model_bits"] == report["passes"][0]["total_model_bits"] == report["total_model_bits"]
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    # 2 blocks: each residual add + LayerNorm is one SkipLayerNormalization, attention one GroupQueryAttention
    assert sum(n.op_type == "SkipLayerNormalization" for n in graph.node) == 4
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2
    ops, _ = optimized_ops(tmp_path / "o" / "model.onnx", tmp_path)
    # 13 quantized Linears (6 per block, lm_head); each block's q/k/v are packed into one (exporters.pack)
    assert len(report["passes"][0]["layers"]) == 13 and ops["MatMulNBits"] == 13 - 2 * 2
    assert "MatMul" not in ops  # nothing left in fp32
    assert report["gates"]["passed"]


def test_chain_int4_runs_every_torch_stage(compress_here, tmp_path):
    done = compress_here("run", "gpt-s", "--recipe", "chain-int4", "--set", "heal.steps=20", "--set",
                         "lowrank.param_budget=0.5", "--out", str(tmp_path / "o"), *NO_BENCH)
    assert done.returncode == 0, done.stderr
    report = _report(tmp_path / "o")
    assert [p["name"] for p in report["passes"]] == ["structured_prune", "lowrank", "heal", "quantize"]
    pruned, lowrank, _, quantize = report["passes"]
    assert [(layer["before"], layer["after"]) for layer in pruned["layers"]] == [(4, 3)] * 4 + [(512, 384)] * 4
    assert lowrank["layers"]  # at budget 0.5 rank-32 factors of 128-wide layers save parameters (0.8 would not)
    assert lowrank["params"] < pruned["params"] < report["model"]["input_params"]
    assert quantize["params"] == lowrank["params"] == report["model"]["params"]
    lowered = report["artifact"]["lowering"]["lowered"]
    assert len(lowered) == len(quantize["layers"]) and all(e["found_by"] == "name" for e in lowered)
    assert report["summary"]["bits_ratio"] > 32 / 5  # fewer params, and those at ~4.5 bits


def test_min_speedup_gate_fails_with_exit_1_and_the_report_written(compress_here, tmp_path):
    done = compress_here("run", "gpt-xs", "--recipe", "int4", "--set", "gates.min_speedup=1000", "--out",
                         str(tmp_path / "o"), *FAST)
    assert done.returncode == 1, done.stderr
    report = _report(tmp_path / "o")
    check = next(c for c in report["gates"]["checks"] if c["gate"] == "min_speedup")
    baseline, latency = report["baseline_latency"], report["latency"]["cpu"]
    assert check["value"] == min(baseline[b]["p50_ms"] / latency[b]["p50_ms"] for b in ("batch1", "batch16"))
    assert not check["passed"] and not report["gates"]["passed"]
    assert "gate failed: min_speedup" in done.stderr


def test_summary_block_is_the_last_cli_line_and_first_in_report_md(compress, tmp_path):
    # in a process of its own: compress_peak_rss_mb is then the run's own peak, not a test worker's
    done = compress("run", "gpt-xs", "--recipe", "int8", "--out", str(tmp_path / "o"), *NO_BENCH)
    assert done.returncode == 0, done.stderr
    report = _report(tmp_path / "o")
    summary = report["summary"]
    input_bits = report["model"]["input_params"] * 32
    assert summary["bits_ratio"] == pytest.approx(input_bits / report["total_model_bits"], rel=1e-12)
    assert summary["bytes_ratio"] == pytest.approx(report["model"]["input_params"] * 4 / report["artifact"]["bytes"])
    reference, measured = report["accuracy"]["reference"], report["accuracy"]["onnxruntime"]["cpu"]
    assert summary["metric_change"] == pytest.approx((reference - measured) / reference)  # lower perplexity = better
    assert summary["verdict"] == ("better" if measured < reference else "worse")
    last_line = done.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"summary: {summary['bits_ratio']:.2f}x fewer total model bits")
    assert (tmp_path / "o" / "report.md").read_text().splitlines()[2].startswith("**Summary:**")
    assert 100 < report["memory"]["compress_peak_rss_mb"] < 4096

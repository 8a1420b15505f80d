"""compress scaling: the Pareto front and budgets on hand-made runs, the grid refused before any model loads
(one line, exit 2), resume from stored results, and one real sweep on gpt-xs."""
import json

import pytest
from click.testing import CliRunner

from compressor import scaling
from compressor.cli import main
from compressor.errors import UserError
from compressor.scaling import Grid, Settings, SweepConfig, best_per_budget, pareto_front, parse_grid


def _run(label, total_bits, metric, status="ok", params=100):
    return {"label": label, "status": status, "total_model_bits": total_bits, "bits_per_param": total_bits / params,
            "metric": metric, "dtype": "int", "bits": 4, "block_size": "B64", "budget_bits_per_param": None}


RUNS = [_run("a", 300, 5.0), _run("b", 400, 4.0), _run("c", 400, 4.5), _run("d", 500, 4.0), _run("e", 200, 9.0),
        _run("f", 250, 9.5), _run("g", 100, 1.0, status="skipped")]


def test_pareto_lower_is_better():
    # c loses to b at equal bits; d ties b's metric with more bits; f has more bits and a worse metric than e;
    # the skipped run's numbers never count
    assert [r["label"] for r in pareto_front(RUNS, higher_is_better=False)] == ["e", "a", "b"]


def test_pareto_higher_is_better():
    # accuracy: d (500 bits) is beaten by b (400) at 4.0 < 4.5 of c; e < f, so f is kept for its 9.5
    assert [r["label"] for r in pareto_front(RUNS, higher_is_better=True)] == ["e", "f"]


def test_pareto_keeps_exact_duplicates_once_each():
    twins = [_run("x", 300, 5.0), _run("y", 300, 5.0)]
    assert [r["label"] for r in pareto_front(twins, False)] == ["x", "y"]  # neither strictly dominates


def test_best_per_budget_respects_the_limit_and_direction():
    entries = best_per_budget(RUNS, budgets=[2.6], bits_values=[4, 3], higher_is_better=False)
    assert [(e["from"], e["bits_per_param"]) for e in entries] == [("budget", 2.6), ("bits", 3.0), ("bits", 4.0)]
    assert entries[0]["best"]["label"] == "e"  # only e (2.0) and f (2.5) fit; e has the lower perplexity
    assert entries[1]["best"]["label"] == "a"  # a, e, f fit at <= 3
    assert entries[2]["best"]["label"] == "b"  # b and c tie on bits, b is better; d (5.0) does not fit
    assert best_per_budget(RUNS, [1.5], [], False)[0]["best"] is None  # the skipped g would, were it measured
    assert best_per_budget(RUNS, [2.6], [], True)[0]["best"]["label"] == "f"


def test_configs_and_labels():
    grid = parse_grid("int,nf", "3, 4", "64,channel", ("4.5,5", "6"))
    assert grid == Grid(("int", "nf"), (3, 4), (64, 0), (4.5, 5.0, 6.0))
    labels = [c.label for c in grid.configs()]
    assert labels[:3] == ["int3-B64", "int3-channel", "int4-B64"] and labels[-3:] == ["budget-4.5", "budget-5",
                                                                                       "budget-6"]
    assert SweepConfig("log2", 8, 0).overrides == ("quantize.dtype=log2", "quantize.bits=8", "quantize.block_size=0")
    assert SweepConfig("log2", 8, 0).label == "log8-channel"  # as the quantize pass labels it
    # budget runs: the int4 preset's quantize fields spelled out, so they differ from the grid in the Linears only
    assert SweepConfig(budget=4.5).overrides == scaling.BUDGET_BASE + ("quantize.budget_bits_per_param=4.5",)


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "int,fp4"], "--dtypes: unknown data type 'fp4'"),
    (["--dtypes", " , "], "--dtypes: empty list"),
    (["--bits", "4,9"], "--bits: '9' is not an integer in 2..8"),
    (["--bits", "1"], "--bits: '1' is not an integer in 2..8"),
    (["--bits", ""], "--bits: empty list"),
    (["--block-sizes", "48"], "--block-sizes: '48' is not a power of two in 16..1024 or 'channel'"),
    (["--block-sizes", "2048"], "--block-sizes: '2048' is not a power of two"),
    (["--block-sizes", "tensor"], "--block-sizes: 'tensor' is not a power of two"),
    (["--budget", "0"], "--budget: '0' is not a number of bits per parameter in (0, 32]"),
    (["--budget", "-1"], "--budget: '-1' is not a number"),
    (["--budget", "nan"], "--budget: 'nan' is not a number"),
    (["--budget", "four"], "--budget: 'four' is not a number"),
])
def test_bad_grid_is_refused_before_loading(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(scaling, "measure_job", _must_not_run)
    result = CliRunner().invoke(main, ["scaling", "gpt-xs", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_impossible_recipe_is_refused_with_its_label(monkeypatch):
    # the grid's own checks pass; the quantize config's (resolve_recipe) refuses: named by the configuration
    original = SweepConfig.overrides.fget
    monkeypatch.setattr(SweepConfig, "overrides", property(
        lambda self: original(self) + (("quantize.exponent_bits=3",) if self.dtype == "float" else ())))
    with pytest.raises(UserError, match=r"^float2-B64 cannot be run: quantize: "):
        scaling.check_grid(parse_grid("int,float", "2", "64"))


def test_budget_without_the_allocator_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "allocator_available", lambda: False)
    result = CliRunner().invoke(main, ["scaling", "gpt-xs", "--out", str(tmp_path), "--budget", "4.5"])
    assert result.exit_code == 2
    assert result.stderr == ("error: --budget: the bit-budget allocator (quantize.budget_bits_per_param) is not "
                             "available in this install\n")


def test_workers_without_ray_exit_2(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setattr(scaling, "measure_job", _must_not_run)
    for option in (["--workers", "2"], ["--ray-address", "127.0.0.1:6379"]):
        result = CliRunner().invoke(main, ["scaling", "gpt-xs", "--out", str(tmp_path / "out"), "--bits", "4",
                                           "--dtypes", "int", "--block-sizes", "64", *option])
        assert result.exit_code == 2
        assert "pip install compressor[scaling]" in result.stderr and result.stderr.count("\n") == 1


def _must_not_run(job):
    raise AssertionError(f"{job.config.label} was measured")


def _fake_measure(calls):
    def measure(job):
        calls.append(job.config.label)
        bits = job.config.bits
        return {"label": job.config.label, "dtype": job.config.dtype, "bits": bits,
                "block_size": scaling.block_name(job.config.block_size), "budget_bits_per_param": None,
                "status": "ok", "total_model_bits": 100 * bits, "bits_per_param": bits + 0.5, "params": 100,
                "metric_name": "perplexity", "higher_is_better": False, "metric": 10.0 / bits,
                "measured_by": "onnxruntime-cpu", "reference_metrics": {"perplexity": 2.0},
                "layers_skipped": 0, "seen_reference": job.reference_metrics}
    return measure


def test_resume_skips_finished_configurations(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scaling, "measure_job", _fake_measure(calls))
    grid = parse_grid("int,nf", "3,4", "64")
    first = scaling.sweep("gpt-xs", tmp_path, grid, Settings(eval_limit=8), progress=False, log=lambda _: None)
    assert calls == ["int3-B64", "int4-B64", "nf3-B64", "nf4-B64"]
    # the first measured run measures the reference; the others are handed it
    assert [r["seen_reference"] for r in first["runs"]] == [None] + [{"perplexity": 2.0}] * 3
    calls.clear()
    again = scaling.sweep("gpt-xs", tmp_path, grid, Settings(eval_limit=8), progress=False, log=lambda _: None)
    assert calls == [] and again["runs"] == first["runs"] and again["timing"]["resumed"] == 4
    # one more bit width: only its configurations run
    scaling.sweep("gpt-xs", tmp_path, parse_grid("int,nf", "3,4,5", "64"), Settings(eval_limit=8), progress=False,
                  log=lambda _: None)
    assert calls == ["int5-B64", "nf5-B64"]
    calls.clear()
    # other settings: the stored results do not match their fingerprint and are measured again
    scaling.sweep("gpt-xs", tmp_path, grid, Settings(eval_limit=16), progress=False, log=lambda _: None)
    assert calls == ["int3-B64", "int4-B64", "nf3-B64", "nf4-B64"]
    stored = json.loads((tmp_path / "runs" / "int3-B64.json").read_text())
    assert set(stored) == {"fingerprint", "row"} and len(stored["fingerprint"]) == 64


def test_a_corrupt_result_file_is_measured_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scaling, "measure_job", _fake_measure(calls))
    grid = parse_grid("int", "4", "64")
    scaling.sweep("gpt-xs", tmp_path, grid, progress=False, log=lambda _: None)
    (tmp_path / "runs" / "int4-B64.json").write_text("{not json")
    calls.clear()
    scaling.sweep("gpt-xs", tmp_path, grid, progress=False, log=lambda _: None)
    assert calls == ["int4-B64"]


@pytest.fixture(scope="module")
def xs_sweep(tmp_path_factory):
    """A real sweep on gpt-xs: 2 data types x 2 bit widths x block 64, plus nf4-B1024, which fits no layer."""
    out = tmp_path_factory.mktemp("scaling") / "serial"
    result = CliRunner().invoke(main, ["scaling", "gpt-xs", "--out", str(out), "--dtypes", "int,nf", "--bits",
                                       "3,4", "--block-sizes", "64", "--eval-limit", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_real_sweep_on_gpt_xs(xs_sweep):
    result = json.loads((xs_sweep / "scaling.json").read_text())
    runs = {r["label"]: r for r in result["runs"]}
    assert list(runs) == ["int3-B64", "int4-B64", "nf3-B64", "nf4-B64"]
    for label, run in runs.items():
        report = json.loads((xs_sweep / "runs" / label / "report.json").read_text())
        assert run["total_model_bits"] == report["total_model_bits"]  # as the report counts them
        assert run["metric"] == report["accuracy"]["onnxruntime"]["cpu"] and run["metric_name"] == "perplexity"
        assert run["artifact_bytes"] == (xs_sweep / "runs" / label / "model.onnx").stat().st_size
        assert report["latency"] == {} and report["plots"] == []  # no benchmark, no per-run plots in a sweep
        assert report["accuracy"]["reference"] == result["reference"]
    assert runs["int4-B64"]["metric"] < runs["int3-B64"]["metric"]  # 4 bits beat 3 at the same block size
    front = [r["label"] for r in result["pareto"]]
    assert front == [r["label"] for r in pareto_front(result["runs"], False)] and front
    for name in ("scaling.md", "scaling_by_bits.png", "scaling_by_dtype.png", "scaling_pareto.png"):
        assert (xs_sweep / name).stat().st_size > 0
    assert "| int | 4 |" in (xs_sweep / "scaling.md").read_text()


def test_a_sweep_run_is_a_compress_run(xs_sweep, tmp_path):
    # the sweep loads the checkpoint once and hands each run a copy, passes the reference metrics, skips the
    # benchmark: the artifact and its metric are still those of a plain run of the same recipe
    from compressor.pipeline import RunOptions, run

    row = next(r for r in json.loads((xs_sweep / "scaling.json").read_text())["runs"] if r["label"] == "nf4-B64")
    report = run("gpt-xs", tmp_path, RunOptions(overrides=tuple(row["overrides"]), eval_limit=4, progress=False,
                                                bench=None), log=lambda _: None)
    assert report["artifact"]["sha256"] == row["artifact_sha256"]
    assert report["accuracy"]["onnxruntime"]["cpu"] == row["metric"]


def test_a_block_size_that_fits_no_layer_is_skipped(tmp_path):
    result = CliRunner().invoke(main, ["scaling", "gpt-xs", "--out", str(tmp_path), "--dtypes", "nf", "--bits", "4",
                                       "--block-sizes", "1024", "--eval-limit", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    run, = json.loads((tmp_path / "scaling.json").read_text())["runs"]
    assert run["status"] == "skipped" and "does not fit the model" in run["reason"]


TIMINGS = ("seconds", "cpu_seconds")


@pytest.mark.slow  # a local Ray cluster and 2 workers: 31-150 s measured on the loaded 2-core machine
def test_workers_give_the_serial_results(xs_sweep, tmp_path):
    pytest.importorskip("ray")
    result = CliRunner().invoke(main, ["scaling", "gpt-xs", "--out", str(tmp_path), "--dtypes", "int,nf", "--bits",
                                       "3,4", "--block-sizes", "64", "--eval-limit", "4", "--workers", "2",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    serial, parallel = (json.loads((d / "scaling.json").read_text()) for d in (xs_sweep, tmp_path))
    strip = [{k: v for k, v in r.items() if k not in TIMINGS} for r in serial["runs"]]
    assert [{k: v for k, v in r.items() if k not in TIMINGS} for r in parallel["runs"]] == strip
    assert parallel["pareto"] == serial["pareto"] and parallel["timing"]["workers"] == 2


def test_help_exits_0(compress):
    done = compress("scaling", "--help")  # the console script, as a user runs it
    assert done.returncode == 0 and "--block-sizes" in done.stdout and done.stderr == ""

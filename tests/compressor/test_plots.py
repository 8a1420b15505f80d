"""The report's PNG plots: written by a real run, listed in report.json, embedded in report.md, byte-identical when
rendered again, and still drawn when passes, a metric or latency are missing."""
import copy
import json

import matplotlib
import matplotlib.image
import pytest

from compressor.plots import PLOTS, render_png, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def int4_run(shared_run):
    """One end-to-end int4 run of the smallest sample, with its benchmarks (test_generation reads the same run):
    its folder and its report."""
    out = shared_run("gpt-xs int4").out
    return out, json.loads((out / "report.json").read_text())


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    height, width, channels = matplotlib.image.imread(path).shape
    assert height >= 400 and width >= 600 and channels == 4


def test_run_writes_lists_and_embeds_the_plots(int4_run):
    out, report = int4_run
    assert report["plots"] == ["passes.png", "accuracy_vs_size.png", "latency.png"]
    markdown = (out / "report.md").read_text()
    for name in report["plots"]:
        _assert_png(out / name)
        assert f"]({name})" in markdown
    assert not list(out.glob(".*.partial"))


def test_rendering_again_gives_the_same_bytes(int4_run, tmp_path):
    out, report = int4_run
    again = copy.deepcopy(report)
    with matplotlib.rc_context({"lines.linewidth": 5, "font.size": 20}):  # a user's settings must not leak in
        assert write_plots(tmp_path, again) == report["plots"]
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_plots_without_passes_metric_or_latency(int4_run, tmp_path):
    _, report = int4_run
    fp32 = {**copy.deepcopy(report), "passes": []}
    assert write_plots(tmp_path, fp32) == ["passes.png", "accuracy_vs_size.png", "latency.png"]
    _assert_png(tmp_path / "passes.png")

    # A task kind whose metric the pass entries do not carry, higher is better, and no latency measured.
    other = copy.deepcopy(report)
    other["accuracy"].update(metric="bleu", higher_is_better=True)
    other["latency"] = {}
    (tmp_path / "other").mkdir()
    assert write_plots(tmp_path / "other", other) == ["passes.png", "accuracy_vs_size.png"]

    # Nothing to put on the accuracy plot at all.
    empty = copy.deepcopy(other)
    empty["accuracy"].update(reference=None, onnxruntime={})
    assert render_png(PLOTS["accuracy_vs_size.png"][0], empty) is None
    assert render_png(PLOTS["passes.png"][0], empty).startswith(PNG_MAGIC)


def test_latency_plot_with_two_providers_and_a_baseline(int4_run, tmp_path):
    _, report = int4_run
    several = copy.deepcopy(report)
    several["latency"]["cuda"] = copy.deepcopy(several["latency"]["cpu"])
    several["baseline_latency"] = {key: value for key, value in several["latency"]["cpu"].items()
                                   if key.startswith("batch")}
    png = render_png(PLOTS["latency.png"][0], several)
    assert png.startswith(PNG_MAGIC) and png != (int4_run[0] / "latency.png").read_bytes()


def test_latency_plot_has_a_decode_panel_for_decoders(int4_run):
    from compressor.plots import latency_figure

    _, report = int4_run
    assert set(report["generation"]["cpu"]) >= {"artifact", "input"}  # gpt-xs int4: a KV-cache decoder
    panels = latency_figure(report).axes
    assert [ax.get_title() for ax in panels] == ["batch 1", "batch 16", "generation (KV cache)"]
    heights = [bar.get_height() for bar in panels[-1].patches]
    generation = report["generation"]["cpu"]
    assert heights == [generation["input"]["decode_tokens_per_s"], generation["artifact"]["decode_tokens_per_s"]]
    without = copy.deepcopy(report)
    del without["generation"]
    assert len(latency_figure(without).axes) == 2

"""The model family (`fam-*`): its specs span 0.1M..50M parameters, its configs name the text corpus and round-trip,
and the language-modeling task scores each model on the corpus its config names."""
import json
from pathlib import Path

import pytest
import torch

from compressor.inputs.checkpoint import expected_params, load_checkpoint, resolve_sample, save_checkpoint
from compressor.tasks import language_modeling
from samples import text_corpus, wiki_corpus
from samples.gpt import GPTConfig
from samples.registry import FAMILY, FAMILY_PREFIX, SAMPLES, build_model, corpus_module


def _params(spec) -> int:  # from one- and two-layer models on the meta device: the 50M member is never built
    return expected_params(lambda config: build_model(spec.family, config), spec.config.to_dict(), ["layers"])


def test_family_sizes_increase_strictly_from_0_1m_to_50m():
    assert len(FAMILY) >= 6
    params = [_params(spec) for spec in FAMILY]
    assert params == sorted(set(params)), params
    assert 80_000 <= params[0] <= 150_000 and params[-1] >= 50_000_000  # measured 112,672 .. 52,224,192
    ratios = [b / a for a, b in zip(params, params[1:])]
    assert all(2 <= r <= 4 for r in ratios), ratios  # roughly log-spaced


def test_family_members_are_registered_samples_on_the_text_corpus():
    for spec in FAMILY:
        assert spec.name.startswith(FAMILY_PREFIX) and SAMPLES[spec.name] is spec
        assert spec.family == "gpt" and spec.config.corpus == "text" and spec.mixed_precision
    assert all(spec.config.corpus == "wiki" for name, spec in SAMPLES.items() if name.startswith("gpt-"))


def test_family_config_round_trips_through_a_checkpoint(tmp_path):
    spec = FAMILY[0]
    assert GPTConfig(**spec.config.to_dict()) == spec.config
    model = build_model(spec.family, spec.config.to_dict())
    save_checkpoint(tmp_path / "ckpt", spec.name, spec.family, model)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == spec.config.to_dict() and loaded.config["corpus"] == "text"
    assert loaded.model.config == spec.config
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())


def test_shipped_members_and_old_checkpoints_name_their_corpus(shipped):
    for name in ("fam-0.1m", "fam-0.3m"):
        record = json.loads((shipped / name / "config.json").read_text())
        assert record["config"]["corpus"] == "text" and record["training"]["corpus"]["name"] == "text-corpus-v1"
        assert resolve_sample(Path(name)) == shipped / name
    old = json.loads((shipped / "gpt-xs" / "config.json").read_text())["config"]
    assert "corpus" not in old and GPTConfig(**old).corpus == "wiki"  # checkpoints from before the field


def test_unknown_corpus_is_refused():
    with pytest.raises(ValueError, match="unknown corpus 'bogus'"):
        GPTConfig(corpus="bogus")
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_module("bogus")


def test_task_reads_the_corpus_the_config_names():
    assert language_modeling._corpus({"context": 128}) is wiki_corpus
    assert language_modeling._corpus({"context": 128, "corpus": "text"}) is text_corpus


@pytest.mark.slow
def test_shipped_member_scores_on_the_text_corpus(shipped):
    """Needs the corpus built (`python -m samples.text_corpus build`: Debian packages, ~1 min)."""
    from compressor.torch_logits import torch_logits_fn

    checkpoint = load_checkpoint(shipped / "fam-0.1m")
    windows = language_modeling.heldout_data(checkpoint.config, 64)
    perplexity = language_modeling.evaluate(torch_logits_fn(checkpoint.model, language_modeling.INPUT_NAMES),
                                            windows)
    assert 5.5 < perplexity < 8.5  # 6.73 on the whole held-out split at the end of training

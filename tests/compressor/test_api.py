"""The Python API (compressor.compress): a path or an nn.Module, a recipe as pass configs, the report back."""
import hashlib
from pathlib import Path

import onnx
import pytest
import torch

import compressor
from compressor.errors import UserError
from compressor.inputs.checkpoint import load_checkpoint, resolve_sample
from passes.prune import PruneConfig
from passes.quantize import QuantizeConfig

QUIET = {"bench": None, "eval_limit": 8, "log": lambda *_: None}
# the `int4` preset's fields, as Python objects
INT4 = QuantizeConfig(bits=4, block_size=32, full_range=True, scale_search="mse", tied_table="shared", embedding_bits=4,
                      embedding_block_size=32)


def _initializer_hashes(path: Path) -> dict[str, str]:
    model = onnx.load(str(path))
    return {t.name: hashlib.sha256(t.SerializeToString()).hexdigest() for t in model.graph.initializer}


@pytest.fixture(scope="module")
def preset_int4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preset") / "int4"
    compressor.compress("gpt-xs", "int4", out, **QUIET)
    return out


def test_pass_configs_give_the_presets_artifact(tmp_path, preset_int4):
    report = compressor.compress("gpt-xs", [INT4], tmp_path / "api", **QUIET)
    assert report["summary"]["bits_ratio"] > 5.5  # int4 B32 with 4-bit tables: about 6.0x fewer bits than fp32
    assert (tmp_path / "api" / "report.json").is_file()
    assert _initializer_hashes(tmp_path / "api" / "model.onnx") == _initializer_hashes(preset_int4 / "model.onnx")


def test_a_module_compresses_like_its_folder_and_is_left_as_it_was(tmp_path, preset_int4):
    model = load_checkpoint(resolve_sample(Path("gpt-xs"))).model
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = compressor.compress(model, "int4", tmp_path / "module", **QUIET)
    assert report["model"]["input_format"] == "nn-module"
    assert _initializer_hashes(tmp_path / "module" / "model.onnx") == _initializer_hashes(preset_int4 / "model.onnx")
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_pass_configs_run_in_stage_order(tmp_path):
    report = compressor.compress("gpt-xs", [QuantizeConfig(bits=8, block_size=0), PruneConfig(sparsity=0.25)],
                                 tmp_path / "chain", **QUIET)
    assert [p["name"] for p in report["passes"]] == ["prune", "quantize"]


@pytest.mark.parametrize("recipe, message", [
    (["int4"], "not a pass config"),
    ([INT4, INT4], "given twice"),
])
def test_a_recipe_that_is_not_pass_configs_is_a_user_error(tmp_path, recipe, message):
    with pytest.raises(UserError, match=message):
        compressor.compress("gpt-xs", recipe, tmp_path / "bad", **QUIET)
    assert not (tmp_path / "bad").exists()


def test_a_module_of_no_sample_family_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="sample families"):
        compressor.compress(torch.nn.Linear(4, 4), "int4", tmp_path / "linear", **QUIET)

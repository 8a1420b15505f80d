"""Recipes resolve presets and --set overrides, and reject bad values before any model is loaded."""
import pytest
from click.testing import CliRunner

from compressor.inputs.checkpoint import model_skeleton
from compressor.cli import main
from compressor.errors import UserError
from compressor.recipes import PRESETS, check_recipe_fits, resolve_recipe
from samples.registry import SHIPPED_DIR


def test_presets_resolve():
    for name in PRESETS:
        recipe = resolve_recipe(name)
        assert recipe.name == name
    int4 = dict(resolve_recipe("int4").passes)["quantize"]
    assert (int4.dtype, int4.bits, int4.block_size) == ("int", 4, 32)


def test_the_int4_preset_is_data_free_and_stores_a_tied_table_once():
    """int4 (issue 29): searched scales that need no calibration data (ONNX inputs and a streamed run's head take
    it as it is), a tied table stored once; the label names the search."""
    int4 = dict(resolve_recipe("int4").passes)["quantize"]
    assert (int4.scale_search, int4.tied_table, int4.full_range, int4.symmetric) == ("mse", "shared", True, True)
    assert not int4.needs_calibration and int4.label() == "int4-B32-full-mse-emb4"


def test_overrides_apply():
    config = dict(resolve_recipe("int4", ("quantize.bits=3", "quantize.block_size=128",
                                          "quantize.ignore=lm_head,re:mlp")).passes)["quantize"]
    assert (config.bits, config.block_size, config.ignore) == (3, 128, ("lm_head", "re:mlp"))


@pytest.mark.parametrize("override, needle", [
    ("quantize.bits=9", "bits must be"),
    ("quantize.bits=1", "bits must be"),
    ("quantize.block_size=48", "power of two"),
    ("quantize.dtype=int5", "dtype must be"),
    ("quantize.method=gptq", "gptq works with dtype=int only"),
    ("quantize.wibble=1", "unknown key 'wibble'"),
    ("quantize.bit=3", "did you mean 'bits'?"),
    ("quantize.bits=four", "quantize.bits must be int"),
    ("quantize.symmetric=maybe", "quantize.symmetric must be bool"),
    ("prune.amount=0.5", "unknown key 'amount'"),
    ("pruning.sparsity=0.5", "did you mean 'prune'?"),
    ("prune.pattern=3:2", "need 0 < N < M"),
    ("lowrank.energy=0.9", "exactly one of"),
    ("bits=3", "PASS.KEY=VALUE"),
])
def test_bad_overrides_are_one_line_errors(override, needle):
    base = "nf4" if "gptq" in override else "int4"
    with pytest.raises(UserError) as exc:
        resolve_recipe(base, (override,))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_stage_order_is_enforced():
    recipe = resolve_recipe("int4", ("prune.sparsity=0.5", "lowrank.rank_ratio=0.25"))
    assert [name for name, _ in recipe.passes] == ["prune", "lowrank", "quantize"]
    assert dict(resolve_recipe("prune24").passes)["prune"].n_m == (2, 4)
    assert dict(resolve_recipe("fp32", ("prune.pattern=4:8",)).passes)["prune"].n_m == (4, 8)


def test_bad_recipe_fails_before_loading_the_model(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "no-such-checkpoint"), "--recipe", "int4", "--set",
                                       "quantize.bits=0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "bits must be" in result.output  # not "checkpoint not found"
    assert not (tmp_path / "o").exists()


def _gpt_xs_skeleton():
    return model_skeleton(SHIPPED_DIR / "gpt-xs")  # Linear in_features 64 and 256; no weights read


def test_recipe_fits_when_its_block_size_divides_some_layers():
    skeleton = _gpt_xs_skeleton()
    assert all(p.is_meta for p in skeleton.parameters())
    check_recipe_fits(resolve_recipe("nf4", ("quantize.block_size=128",)), skeleton)  # the 256-wide ones fit
    check_recipe_fits(resolve_recipe("int4", ("quantize.block_size=512",)), skeleton)  # int: a shorter last block
    # after low-rank the layer shapes are not known yet: the quantize pass checks itself when it runs
    check_recipe_fits(resolve_recipe("lowrank-int4", ("quantize.targets=re:no-such-layer",)), skeleton)


@pytest.mark.parametrize("overrides, needle", [
    (("quantize.dtype=nf", "quantize.block_size=512"), "block_size 512 divides the in_features of none of the 13"),
    (("quantize.ignore=re:.*",), "select no nn.Linear"),
    (("prune.pattern=1:1024",), "the M of pattern 1:1024 divides the in_features of none"),
    (("lowrank.targets=lm_head", "lowrank.ignore=lm_head"), "lowrank: its targets / ignore select no"),
])
def test_recipe_that_fits_no_layer_is_refused(overrides, needle):
    with pytest.raises(UserError) as exc:
        check_recipe_fits(resolve_recipe("int4", overrides), _gpt_xs_skeleton())
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_export_section_from_a_file_and_from_set(tmp_path):
    from compressor.errors import UserError
    from compressor.recipes import resolve_recipe

    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - quantize: {bits: 4}\nexport: {dtype: float16}\n")
    recipe = resolve_recipe(str(path))
    assert recipe.export.dtype == "float16" and "export:\n  dtype: float16" in recipe.to_yaml()
    assert resolve_recipe("int4", ("export.dtype=float16",)).export.dtype == "float16"
    assert resolve_recipe("int4").export.dtype == "float32"
    for bad, message in ((("export.dtype=bf16",), "export.dtype must be one of float32, float16"),
                         (("export.dtyp=float16",), "export: unknown key 'dtyp'")):
        try:
            resolve_recipe("int4", bad)
        except UserError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")

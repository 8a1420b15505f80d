"""YAML recipe files, gates and `compress passes`."""
import json

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.errors import UserError
from compressor.recipes import resolve_recipe

GOOD = """
passes:
  - prune: {method: wanda, sparsity: 0.25}
  - quantize: {dtype: int, bits: 4, block_size: 32}
gates:
  min_recovery: 0.5
"""


def test_recipe_file_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    recipe = resolve_recipe(str(path))
    assert [name for name, _ in recipe.passes] == ["prune", "quantize"]
    assert recipe.gates.min_recovery == 0.5
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert resolve_recipe(str(again)).passes == recipe.passes


@pytest.mark.parametrize("text, needle", [
    ("passes:\n  - quantize: {bits: 4}\n  - prune: {sparsity: 0.5}\n", "stage order"),
    ("passes:\n  - quantise: {bits: 4}\n", "did you mean 'quantize'?"),
    ("passes:\n  - quantize: {bitz: 4}\n", "did you mean 'bits'?"),
    ("passes:\n  - quantize: {bits: 9}\n", "bits must be"),
    ("passes:\n  - quantize: {block_size: 100}\n", "power of two"),
    ("pases: []\n", "did you mean 'passes'?"),
    ("passes:\n  - quantize: {bits: 4}\n  - quantize: {bits: 3}\n", "listed twice"),
    ("gates: {min_recovery: -1}\n", "positive number"),
    ("passes: [unclosed\n", "not valid YAML"),
])
def test_bad_recipe_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        resolve_recipe(str(path))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_failed_gate_exits_1_with_report_written(tmp_path):
    path = tmp_path / "strict.yaml"
    path.write_text("passes:\n  - quantize: {bits: 2, block_size: 32}\ngates:\n  min_recovery: 0.99\n")
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["run", "gpt-xs", "--recipe", str(path), "--out", str(out),
                                       "--eval-limit", "8", "--no-bench", "--quiet"])
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    recovery = next(c for c in report["gates"]["checks"] if c["gate"] == "min_recovery")
    assert not recovery["passed"] and recovery["value"] < 0.99  # 2-bit gpt-xs loses far more than 1%
    assert (out / "recipe.yaml").exists() and (out / "model.onnx").exists()


def test_passes_command_lists_every_pass():
    result = CliRunner().invoke(main, ["passes"])
    assert result.exit_code == 0
    for name in ("prune", "structured_prune", "lowrank", "heal", "quantize", "gates", "block_size: int = 64"):
        assert name in result.output
    from compressor.recipes import PRESETS
    presets = result.output.split("presets:\n", 1)[1]
    assert [line.split(":")[0].strip() for line in presets.splitlines()] == list(PRESETS)

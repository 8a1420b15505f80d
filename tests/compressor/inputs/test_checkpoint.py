"""Checkpoints load safely: corrupted, pickled-with-code, mismatched or non-finite ones fail with one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from compressor.inputs.checkpoint import load_checkpoint, save_checkpoint
from compressor.errors import UserError
from samples.gpt import GPT, GPTConfig


@pytest.fixture()
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", "tiny", "gpt", GPT(GPTConfig(layers=1, width=16, heads=2)))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    original = GPT(GPTConfig(layers=1, width=16, heads=2)).eval()
    loaded = load_checkpoint(save_checkpoint(tmp_path / "rt", "tiny", "gpt", original))
    ids = torch.randint(0, 256, (2, 8))
    assert loaded.family == "gpt" and loaded.name == "tiny"
    assert torch.equal(loaded.model(ids), original(ids))


def test_truncated_safetensors(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError) as exc:
        load_checkpoint(tiny_checkpoint)
    assert "safetensors" in _one_line(exc)


def test_garbage_config(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(UserError) as exc:
        load_checkpoint(tiny_checkpoint)
    assert "not valid JSON" in _one_line(exc)


def test_config_that_does_not_match_weights(tiny_checkpoint):
    record = json.loads((tiny_checkpoint / "config.json").read_text())
    record["config"]["width"] = 32
    (tiny_checkpoint / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as exc:
        load_checkpoint(tiny_checkpoint)
    assert "shape" in _one_line(exc)


def test_unknown_config_key(tiny_checkpoint):
    record = json.loads((tiny_checkpoint / "config.json").read_text())
    record["config"]["wdith"] = 32
    (tiny_checkpoint / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as exc:
        load_checkpoint(tiny_checkpoint)
    assert "invalid model config" in _one_line(exc)


def test_nan_weights(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    loaded.model.lm_head.weight.data[0, 0] = float("nan")
    save_checkpoint(tiny_checkpoint, "tiny", "gpt", loaded.model)
    with pytest.raises(UserError) as exc:
        load_checkpoint(tiny_checkpoint)
    assert "NaN" in _one_line(exc)


class _Exploit:
    """Unpickling this would create a file: the loader must refuse before that happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_and_never_run(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    (tiny_checkpoint / "model.safetensors").unlink()
    torch.save({"weight": _Exploit(marker)}, tiny_checkpoint / "model.pt")
    with pytest.raises(UserError) as exc:
        load_checkpoint(tiny_checkpoint)
    assert "weights_only" in _one_line(exc)
    assert not marker.exists()


def test_plain_torch_state_dict_loads(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    (tiny_checkpoint / "model.safetensors").unlink()
    torch.save(loaded.model.state_dict(), tiny_checkpoint / "model.pt")
    again = load_checkpoint(tiny_checkpoint)
    assert again.weights_path.name == "model.pt"


def test_missing_path_and_missing_config(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "lonely.safetensors")
    with pytest.raises(UserError, match="config.json"):
        load_checkpoint(tmp_path / "lonely.safetensors")

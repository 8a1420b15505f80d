"""Hugging Face and GGUF inputs a user can have that were exit 3 (or worse): a tokenizer that cannot be read, a
config transformers 5 refuses with its own exception types, a safetensors header that does not parse, folders named
*.gguf, and the GGUF dequantization cache (part-written, raced, unwritable). Each is one line and exit 2, or works."""
import json
import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from compressor.errors import UserError  # noqa: E402
from compressor.inputs import hf  # noqa: E402
from hf_files import copy_folder, write_gguf  # noqa: E402


def _refused(compress_here, path: Path, tmp_path: Path) -> str:
    done = compress_here("run", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert not (tmp_path / "out").exists()
    return done.stderr.strip()


@pytest.mark.parametrize("content, reason", [
    ("{not json", "JSONDecodeError: Expecting property name"),
    (json.dumps({"model": {"type": "BPE"}}), "KeyError: 'added_tokens'"),
])
def test_a_tokenizer_that_cannot_be_read(compress_here, tiny_llama, tmp_path, content, reason):
    folder = copy_folder(tiny_llama, tmp_path)
    (folder / "tokenizer.json").write_text(content)
    assert _refused(compress_here, folder, tmp_path).startswith(
        f"error: {folder}: its tokenizer cannot be read ({reason}")


@pytest.mark.parametrize("change, reason", [
    ({"num_attention_heads": "four"}, "Validation error for field 'num_attention_heads': TypeError: Field "
                                      "'num_attention_heads' expected int, got str (value: 'four')"),
    ({"num_attention_heads": 5}, "Class validation error for validator 'validate_architecture': ValueError: The "
                                 "hidden size (96) is not a multiple of the number of attention heads (5)."),
])
def test_config_values_transformers_refuses(compress_here, tiny_llama, tmp_path, change, reason):
    folder = copy_folder(tiny_llama, tmp_path, **change)
    assert _refused(compress_here, folder, tmp_path) == f"error: {folder}/config.json: invalid model config ({reason})"


def test_a_safetensors_header_that_does_not_parse(compress_here, tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:9] = b"["  # the JSON header opens with [ instead of {
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert _refused(compress_here, folder, tmp_path).startswith(
        f"error: {folder}/model.safetensors is not a readable safetensors file (Error while deserializing header")


def test_folders_named_like_gguf_files_are_what_they_hold(tiny_llama, shipped, tmp_path):
    """Our checkpoint in a folder named x.gguf is ours; a Hugging Face folder so named is a folder (both were
    exit 3: an IndexError looking for the .gguf inside)."""
    import shutil

    from compressor.inputs import adapter_for

    ours = tmp_path / "ours.gguf"
    shutil.copytree(shipped / "gpt-xs", ours)
    assert adapter_for(ours)[1].kind == "checkpoint"
    folder = tmp_path / "llama.gguf"
    shutil.copytree(tiny_llama, folder)
    adapter = adapter_for(folder)[1]
    assert adapter.kind == "hugging-face" and adapter.skeleton(folder) is not None
    assert hf.load_hf_checkpoint(folder).family == "hf-causal-lm"


@pytest.fixture
def gguf_file(tiny_llama, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return write_gguf(tiny_llama, tmp_path / "model.gguf")


def _cache_folder(gguf: Path) -> Path:
    from compressor.atomic import sha256_file

    return Path(os.environ["COMPRESSOR_CACHE"]) / "gguf" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"


def test_a_part_written_cache_folder_is_made_again(gguf_file):
    folder = _cache_folder(gguf_file)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # what a crash or a half-deleted cache leaves: no weights
    assert hf.dequantized_gguf_folder(gguf_file) == folder
    assert (folder / "gguf_source.json").is_file() and (folder / "model.safetensors").is_file()
    (folder / "model.safetensors").write_bytes(b"truncated")  # unreadable weights: made again too
    hf.dequantized_gguf_folder(gguf_file)
    assert hf.load_hf_checkpoint(gguf_file).family == "hf-causal-lm"


def test_a_run_that_loses_the_race_for_the_cache_uses_the_winners(gguf_file, monkeypatch):
    """Two first runs at once: the second to finish finds the folder made by the first (was: exit 3, ENOTEMPTY)."""
    folder = _cache_folder(gguf_file)
    replace = os.replace

    def first_run_wins(source, target):
        if Path(target) == folder and not folder.exists():
            monkeypatch.setattr(hf.os, "replace", replace)
            winner = Path(str(source) + ".winner")
            import shutil

            shutil.copytree(source, winner)
            replace(winner, target)  # the other run finished first
        return replace(source, target)

    monkeypatch.setattr(hf.os, "replace", first_run_wins)
    assert hf.dequantized_gguf_folder(gguf_file) == folder
    assert hf._cached(folder) and not list(folder.parent.glob(".*"))  # no scratch folder left


def test_an_unwritable_cache_is_one_line(gguf_file, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf.tempfile, "mkdtemp", full)
    with pytest.raises(UserError) as error:
        hf.dequantized_gguf_folder(gguf_file)
    assert str(error.value) == (f"cannot write the GGUF cache {_cache_folder(gguf_file)}: No space left on device "
                                f"(free space there, or set COMPRESSOR_CACHE to another folder)")


def test_gguf_metadata_transformers_cannot_build(tiny_llama, tmp_path, monkeypatch):
    """Llama tensors labelled phi3: its metadata makes a padding id past the vocabulary, which torch asserts on
    (was exit 3: AssertionError)."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_llama, tmp_path / "model.gguf", architecture="phi3")
    with pytest.raises(UserError, match=r"model.gguf: its metadata is not a model config transformers can build "
                                        r"\(Padding_idx must be within num_embeddings\)$"):
        hf.hf_model_skeleton(path)

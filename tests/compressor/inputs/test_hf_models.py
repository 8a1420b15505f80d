"""Hugging Face model folders through `compress run`: tiny randomly initialised BERT, Llama and GPT-2 built here
with transformers (the same loading, wrapping, export and validation code the real models take; the real ones
run in test_hf_real_models.py, marked slow), plus their bad-input cases."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compressor.inputs.hf import load_hf_checkpoint  # noqa: E402
from compressor.tasks import hf_language_modeling, sentence_embedding  # noqa: E402
from conftest import bpe_tokenizer  # noqa: E402
from samples import wiki_corpus  # noqa: E402


def _wordpiece_tokenizer(folder: Path) -> int:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["the", "a", "and", "of", "film", "movie", "good", "bad", "is", "it", "not", "great", "this", "to"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *words,
             *".,'!?-"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    return len(vocab)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = _wordpiece_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128)
    return _save(transformers.BertModel(config), folder)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = bpe_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return _save(transformers.GPT2LMHeadModel(config), folder)


def test_encoder_folder_int8_end_to_end(compress_here, tiny_bert, tmp_path):
    done = compress_here("run", str(tiny_bert), "--out", str(tmp_path / "out"), "--recipe", "int8",
                         "--eval-limit", "96", "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["family"] == "hf-encoder"
    accuracy = report["accuracy"]
    assert accuracy["metric"] == "probe_accuracy" and accuracy["heldout_examples"] == 96
    assert accuracy["agreement"]["cpu"]["passed"]
    # int8 per-channel on a random 64-wide encoder: cosine to fp32 stays high (measured 0.9999)
    assert accuracy["side_metrics"]["cpu"]["cosine_to_fp32"] > 0.99
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert len(report["passes"][0]["layers"]) == 2 * 6  # q, k, v, o, up, down per layer
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert "compressor.task_state" in {p.key for p in model.metadata_props}  # the probe, for compress check
    check = compress_here("check", str(tmp_path / "out" / "model.onnx"), "--baseline",
                          str(tmp_path / "out" / "report.json"), "--tolerance", "0")
    assert check.returncode == 0 and check.stdout.startswith("ok: probe_accuracy"), check.stdout + check.stderr


def test_encoder_embeddings_are_mean_pooled(tiny_bert):
    checkpoint = load_hf_checkpoint(tiny_bert)
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = checkpoint.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = checkpoint.model(ids, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :4].mean(0))


@pytest.mark.slow  # a full `compress run` of a HF folder, 40-70 s on 2 cores (test_generation runs one by default)
def test_decoder_folder_int4_partial_blocks_and_check(compress, tiny_llama, tmp_path):
    """Hidden 96 is not a multiple of 64: the last block of each row is shorter, every Linear still quantized."""
    out = tmp_path / "out"
    done = compress("run", str(tiny_llama), "--out", str(out), "--recipe", "int4", "--eval-limit", "8",
                     "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["family"] == "hf-causal-lm" and report["accuracy"]["metric"] == "perplexity"
    assert report["passes"][0]["skipped"] == []
    assert len(report["passes"][0]["layers"]) == 2 * 7 + 1  # q k v o gate up down, and the tied lm_head
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert report["accuracy"]["agreement"]["cpu"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert "DequantizeLinear" in {n.op_type for n in graph.node}
    # the embedding table tied to lm_head is stored as lm_head's k-bit codes too (no fp32 copy left)
    tied = [e for e in report["artifact"]["lowering"]["lowered"] if e.get("tied_table")]
    assert len(tied) == 1
    # looked up as int4 codes (blocks of 64) by GatherBlockQuantized: only the rows read are dequantized
    lookup = next(n for n in graph.node if "input_ids" in n.input and n.input[0].endswith(".codes"))
    assert (lookup.op_type, lookup.domain) == ("GatherBlockQuantized", "com.microsoft")
    assert lookup.input[0] == f"{tied[0]['initializer']}.table_q.codes" and tied[0]["lookup"] == lookup.op_type
    assert tied[0]["initializer"] not in {t.name for t in graph.initializer}
    # lm_head reads the same table through Transpose in the fp32 export: lowered by the table's name, no Transpose
    head = next(e for e in report["artifact"]["lowering"]["lowered"] if e["module"] == "decoder.lm_head"
                and not e.get("tied_table"))
    assert head["initializer"] == tied[0]["initializer"] and head["found_by"] == "name"
    assert "Transpose" not in {n.op_type for n in graph.node if tied[0]["initializer"] in "".join(n.input)}
    check = compress("check", str(out / "model.onnx"), "--baseline", str(out / "report.json"))
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow  # a full `compress run` of a HF folder, 40-70 s on 2 cores: run with -m slow
def test_decoder_q4_1_preset_float_zero_points_and_8bit_head(compress, tiny_llama, tmp_path):
    """The q4_1 preset at B = 64 (hidden 96: a short last block): float zero points on every projection, the tied
    lm_head at 8 bits in blocks of 32 (Q8_0), stored once as the embedding's codes; exact-kernel parity with the
    torch model."""
    out = tmp_path / "out"
    done = compress("run", str(tiny_llama), "--out", str(out), "--recipe", "q4_1", "--set",
                     "quantize.block_size=64", "--eval-limit", "8", "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    quantize = report["passes"][0]
    assert quantize["label"] == "int4-B64-asym-fzp (lm_head: int8-B32)"
    bits = {layer["module"].rsplit(".", 1)[-1]: layer["bits"] for layer in quantize["layers"]}
    assert bits.pop("lm_head") == 8 and set(bits.values()) == {4}
    lowered = report["artifact"]["lowering"]["lowered"]
    assert sum(bool(e.get("float_zero_points")) for e in lowered) == 2 * 7
    assert sum(bool(e.get("tied_table")) for e in lowered) == 1
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]
    assert report["accuracy"]["agreement"]["cpu"]["passed"]


@pytest.mark.slow  # a full `compress run` of a HF folder, 40-70 s on 2 cores: run with -m slow
def test_gpt2_conv1d_becomes_linear_and_quantizes(compress, tiny_gpt2, tmp_path):
    checkpoint = load_hf_checkpoint(tiny_gpt2)
    assert not any(type(m).__name__ == "Conv1D" for m in checkpoint.model.modules())
    reference = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_gpt2)).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)
    done = compress("run", str(tiny_gpt2), "--out", str(tmp_path / "out"), "--recipe", "int4", "--eval-limit", "8",
                     "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["passes"][0]["layers"]) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj; lm_head
    assert report["parity"]["by_provider"]["cpu_exact"]["passed"]


def test_heldout_windows_come_from_heldout_text_only(tiny_llama):
    checkpoint = load_hf_checkpoint(tiny_llama)
    windows = hf_language_modeling.heldout_data(checkpoint.config, 4)
    assert windows.shape == (4, checkpoint.config["context"] + 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama))
    text = tokenizer.decode(windows[0])
    assert text in wiki_corpus.split_tokens("heldout").tobytes().decode("utf-8")


def test_probe_is_fitted_on_train_split_and_scores_heldout(tiny_bert):
    checkpoint = load_hf_checkpoint(tiny_bert)
    from compressor.torch_logits import torch_logits_fn

    data = sentence_embedding.heldout_data(checkpoint.config, 64)
    fn = torch_logits_fn(checkpoint.model, sentence_embedding.INPUT_NAMES)
    sentence_embedding.fit_reference(fn, data)
    metrics = sentence_embedding.evaluate_all(fn, data)
    assert metrics["cosine_to_fp32"] == pytest.approx(1.0)
    # a probe with flipped sign must score exactly 1 - accuracy: the metric really reads the probe
    data.probe = -data.probe
    assert sentence_embedding.evaluate(fn, data) == pytest.approx(1 - metrics["probe_accuracy"])


def test_structured_prune_of_an_unknown_family_is_refused_before_weights_load(compress_here, tiny_gpt2, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "model.safetensors").write_bytes(b"truncated")  # never read: the recipe fails first
    done = compress_here("run", str(folder), "--out", str(tmp_path / "out"), "--recipe", "structured25", "--quiet")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "structured_prune" in done.stderr and "GPT2LMHeadModel" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a full `compress run` of a HF folder, 40-70 s on 2 cores: run with -m slow
def test_structured_prune_shrinks_a_llama_folder_end_to_end(compress, tiny_llama, tmp_path):
    out = tmp_path / "out"
    done = compress("run", str(tiny_llama), "--out", str(out), "--recipe", "structured25", "--set",
                    "structured_prune.heads=0.5", "--eval-limit", "4", "--no-bench", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    kinds = [(layer["kind"], layer["before"], layer["after"]) for layer in report["passes"][0]["layers"]]
    assert kinds == [("heads", 4, 2)] * 2 + [("ffn_neurons", 192, 144)] * 2  # one of 2 KV groups, 1/4 of 192
    assert report["model"]["params"] < report["model"]["input_params"]
    assert report["parity"]["passed"]  # the shrunken graph computes what the shrunken torch model does


def test_an_hf_config_deeper_than_its_weights_is_refused_before_building(compress_here, tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    done = compress_here("run", str(folder), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 2 and "does not describe these weights" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_recipe_is_checked_against_the_hf_config_before_weights_load(compress_here, tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").write_bytes(b"truncated")  # never read: the recipe fails first
    done = compress_here("run", str(folder), "--out", str(tmp_path / "out"), "--recipe", "kmeans4",
                     "--set", "quantize.block_size=1024", "--quiet")
    assert done.returncode == 2 and "does not fit the model" in done.stderr, done.stderr


@pytest.mark.parametrize("case", ["no-tokenizer", "no-weights", "nan-weights", "wrong-shapes", "unknown-type"])
def test_bad_hf_folders_fail_with_one_line(compress_here, tiny_llama, tmp_path, case):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    if case == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif case == "no-weights":
        (folder / "model.safetensors").unlink()
    elif case == "nan-weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif case == "wrong-shapes":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 256
        (folder / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "t5"
        (folder / "config.json").write_text(json.dumps(config))
    done = compress_here("run", str(folder), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_partial_last_block_matches_quantizing_the_tail_alone():
    from passes import quant_primitives as qp

    weight = torch.randn(7, 200, generator=torch.Generator().manual_seed(0))
    for quantize in (lambda w, b: qp.quantize_int_symmetric(w, 4, b, full_range=True),
                     lambda w, b: qp.quantize_int_asymmetric(w, 4, b)):
        full = qp.dequantize(quantize(weight, 64))
        assert quantize(weight, 64).scales.shape == (7, 4)  # ceil(200 / 64) blocks
        torch.testing.assert_close(full[:, :192], qp.dequantize(quantize(weight[:, :192], 64)), rtol=0, atol=0)
        torch.testing.assert_close(full[:, 192:], qp.dequantize(quantize(weight[:, 192:], 0)), rtol=0, atol=0)
    assert np.isfinite(full.numpy()).all()


@pytest.mark.parametrize("content", [b"GGUF" + b"\xff" * 64, b"not a gguf at all"])
def test_unreadable_gguf_fails_with_one_line(compress_here, tmp_path, monkeypatch, content):
    (tmp_path / "model.gguf").write_bytes(content)
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    done = compress_here("run", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if "GGUF tensors" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model.onnx").exists() and not list((tmp_path / "cache").glob("gguf/*"))

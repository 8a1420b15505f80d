"""`compress generate` / `compress bench` hold token ids and lengths to what the graph itself takes, read from its
tables (the token table input_ids indexes, the position table or rotary cache), and every size an artifact's
metadata or a config hands to an allocation is bounded first. Out of range, ONNX Runtime's GatherBlockQuantized
returns zero rows (an int4 artifact generates garbage with exit 0) and Gather fails (exit 3). The decoder graphs
here are written directly (exporters.decoder_graph) from small random weights: no pipeline run."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import UserError
from compressor.generation import GraphLimits, generate, graph_limits, read_graph_limits
from compressor.ort_runtime import create_session
from exporters import metadata_keys
from exporters.decoder_graph import Decoder, DecoderLayer, Linear, Norm, build_decoder_graph
from exporters.onnx_export import ExportError

VOCAB, WIDTH, HEAD = 40, 32, 16


def _decoder(positions: int = 24, rotary: bool = False, head_rows: int = VOCAB, head_bias: int | None = None):
    """One layer, two heads of 16 and one KV head; learned positions, or rotary ones (`rotary`); an untied head of
    `head_rows` outputs (a bias of 100 on `head_bias`: greedy picks it)."""
    rng = np.random.default_rng(0)

    def linear(name: str, out: int, into: int) -> list[Linear]:
        return [Linear(name, rng.normal(0, 0.2, (out, into)).astype(np.float32))]

    def norm(name: str) -> Norm:
        return Norm(name, np.ones(WIDTH, np.float32), None if rotary else np.zeros(WIDTH, np.float32), 1e-5)

    layer = DecoderLayer(attn_norm=norm("l0.attn_norm"), q=linear("l0.q", WIDTH, WIDTH), k=linear("l0.k", HEAD, WIDTH),
                         v=linear("l0.v", HEAD, WIDTH), o=linear("l0.o", WIDTH, WIDTH), heads=2, kv_heads=1,
                         head_dim=HEAD, mlp_norm=norm("l0.mlp_norm"),
                         mlp={"up": linear("l0.up", 64, WIDTH), "down": linear("l0.down", WIDTH, 64)},
                         activation="relu")
    head = linear("lm_head", head_rows, WIDTH)
    if head_bias is not None:
        head[0].bias = np.zeros(head_rows, np.float32)
        head[0].bias[head_bias] = 100.0
    return Decoder(vocab_size=head_rows, max_positions=positions, embed_name="embed",
                   embed=rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32), layers=[layer],
                   final_norm=norm("final_norm"), lm_head=head,
                   positions=None if rotary else rng.normal(0, 0.1, (positions, WIDTH)).astype(np.float32),
                   positions_name="pos_table",
                   rotary_inv_freq=(1.0 / 10000 ** (np.arange(0, HEAD, 2) / HEAD)).astype(np.float32) if rotary
                   else None)


def _session(decoder: Decoder):
    return create_session(build_decoder_graph(decoder).SerializeToString())


@pytest.mark.parametrize("rotary", [False, True], ids=["learned-positions", "rotary"])
def test_limits_are_read_from_the_graphs_tables(rotary):
    limits = graph_limits(_session(_decoder(positions=24, rotary=rotary)))
    table = "rotary.cos_cache" if rotary else "pos_table"
    assert limits == GraphLimits(VOCAB, "the rows of its token table embed", 24, f"the rows of {table}")


def test_a_quantized_token_table_behind_a_cast_is_found():
    """Model Builder casts input_ids to int32 before its lookup; int4 tables are GatherBlockQuantized codes."""
    codes = numpy_helper.from_array(np.zeros((300, 16), np.uint8), "table.codes")
    scales = numpy_helper.from_array(np.ones((300, 1), np.float32), "table.scale")
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("GatherBlockQuantized", ["table.codes", "ids32", "table.scale"], ["rows"],
                              domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, "s", 32])],
                              [codes, scales])
    limits = read_graph_limits(helper.make_model(graph).SerializeToString())
    assert (limits.vocab, limits.vocab_source) == (300, "the rows of its token table table.codes")
    assert limits.positions is None


def test_a_prompt_id_outside_the_token_table_is_refused():
    session = _session(_decoder())
    assert len(generate(session, [1, 2, VOCAB - 1], 3).tokens) == 3  # the last row is in range
    for bad in (VOCAB, -1):
        with pytest.raises(UserError) as error:
            generate(session, [1, bad, 2], 3)
        assert str(error.value) == (f"the prompt holds token id {bad}, outside this model's vocabulary of {VOCAB} "
                                    f"(the rows of its token table embed): was it encoded with another model's "
                                    f"tokenizer?")


@pytest.mark.parametrize("rotary", [False, True], ids=["learned-positions", "rotary"])
def test_lengths_past_the_position_table_are_refused_or_cut(rotary):
    session = _session(_decoder(positions=24, rotary=rotary))
    table = "rotary.cos_cache" if rotary else "pos_table"
    with pytest.raises(UserError, match=rf"^the prompt has 24 tokens; this model takes at most 24 in all "
                                        rf"\(the rows of {table}\)$"):
        generate(session, [1] * 24, 5)
    assert len(generate(session, [1] * 20, 100).tokens) == 4  # cut where the table ends: 24 in all


def test_a_head_wider_than_the_token_table_cannot_feed_back_what_it_chose():
    session = _session(_decoder(head_rows=VOCAB + 8, head_bias=VOCAB + 5))
    with pytest.raises(UserError, match=rf"^the model chose token id {VOCAB + 5}, outside its vocabulary of {VOCAB} "
                                        r"\(the rows of its token table embed\): its head and its token table"):
        generate(session, [1, 2], 4)


def _artifact_folder(folder: Path, decoder: Decoder) -> Path:
    folder.mkdir()
    onnx.save(build_decoder_graph(decoder), str(folder / "model.onnx"))
    return folder


def _word_tokenizer(folder: Path, ids: dict[str, int]) -> None:
    """Another model's tokenizer: whole words to the given ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **ids}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def test_generate_with_another_models_tokenizer_exits_2(compress_here, tmp_path):
    pytest.importorskip("tokenizers")
    folder = _artifact_folder(tmp_path / "artifact", _decoder())
    _word_tokenizer(folder, {"hello": 7, "world": 5000})
    done = compress_here("generate", str(folder), "--prompt", "hello hello", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr  # ids in range: generates
    done = compress_here("generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "2")
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr == (f"error: the prompt holds token id 5000, outside this model's vocabulary of {VOCAB} (the "
                           f"rows of its token table embed): was it encoded with another model's tokenizer?\n")


def test_bench_draws_its_prompt_from_the_token_table_and_fits_the_position_table(compress, tmp_path):
    """The head is wider than the token table (its bias keeps greedy decoding on token 3): prompts drawn below the
    logits' width would index past the table (a Gather error: 'generation cpu of model.onnx failed'; zero rows
    from an int4 table)."""
    folder = _artifact_folder(tmp_path / "artifact", _decoder(positions=24, rotary=True, head_rows=VOCAB + 200,
                                                              head_bias=3))
    done = compress("bench", str(folder), "--prompt-tokens", "100", "--new-tokens", "100", "--runs", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["prompt_tokens"] + result["new_tokens"] == 24


def test_bench_refuses_metadata_sizes_before_allocating(compress_here, tmp_path):
    """A full-sequence graph (no KV cache) gets inputs made from its model config: context 10**9 would be a
    7.45 GiB batch."""
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    model = helper.make_model(graph)
    onnx.helper.set_model_props(model, {metadata_keys.FAMILY: "gpt",
                                        metadata_keys.MODEL_CONFIG: json.dumps({"context": 10**9, "vocab_size": 256})})
    onnx.save(model, str(tmp_path / "model.onnx"))
    done = compress_here("bench", str(tmp_path / "model.onnx"))
    assert done.returncode == 2
    assert done.stderr == (f"error: {tmp_path / 'model.onnx'}: compressor.model_config context must be an integer "
                           f"in 1..65,536, not 1000000000\n")


def test_the_exporter_refuses_rotary_tables_past_its_bound():
    """The input adapter refuses such configs first (tests/compressor/inputs/test_hf_config_sizes.py); the
    exporter holds the same bound before it allocates."""
    from exporters.decoder_graph import max_rotary_positions

    limit = max_rotary_positions(HEAD // 2)
    with pytest.raises(ExportError, match=rf"^max_positions {limit + 1:,} needs rotary tables of [\d.]+ GiB; at "
                                          rf"most {limit:,} positions \(1 GiB\)$"):
        build_decoder_graph(_decoder(positions=limit + 1, rotary=True))


def test_generate_reads_a_symbolic_cache_head_size_from_genai_config(compress_here, tmp_path):
    """Model Builder's graphs leave the cache's head size symbolic; their genai_config.json says it (bench read it
    already; generate was exit 3)."""
    pytest.importorskip("tokenizers")
    proto = build_decoder_graph(_decoder())
    for value in proto.graph.input:
        if value.name.startswith("past_key_values."):
            value.type.tensor_type.shape.dim[3].dim_param = "head_size"
    folder = tmp_path / "artifact"
    folder.mkdir()
    onnx.save(proto, str(folder / "model.onnx"))
    _word_tokenizer(folder, {"hello": 7})
    done = compress_here("generate", str(folder), "--prompt", "hello", "--max-new-tokens", "2")
    assert done.returncode == 2
    assert done.stderr == ("error: the graph's cache inputs leave their head size symbolic ('head_size') and no "
                           "genai_config.json beside it says it (model.decoder.head_size)\n")
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 10**9}}}))
    done = compress_here("generate", str(folder), "--prompt", "hello", "--max-new-tokens", "2")
    assert done.returncode == 2  # it sizes the cache buffers
    assert done.stderr == (f"error: {folder / 'genai_config.json'}: model.decoder.head_size must be an integer in "
                           f"1..1,024, not 1000000000\n")
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": HEAD}}}))
    done = compress_here("generate", str(folder), "--prompt", "hello", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr


def test_a_subnormal_temperature_samples_as_greedy():
    """--temperature 5e-324 divided the logits into inf - inf = NaN probabilities (exit 3)."""
    from compressor.generation import Sampling

    session = _session(_decoder())
    greedy = generate(session, [1, 2, 3], 6).tokens
    assert generate(session, [1, 2, 3], 6, sampling=Sampling(temperature=5e-324)).tokens == greedy


def test_bench_lengths_keep_two_new_tokens():
    """One new token left no decode step to time (a ZeroDivisionError in the child)."""
    from compressor.generation_benchmark import fit_lengths

    assert fit_lengths(1_000_000, 2, 129) == (127, 2)
    assert fit_lengths(128, 128, 128) == (64, 64) and fit_lengths(10, 10, None) == (10, 10)
    with pytest.raises(UserError, match="^the model takes 2 positions in all: too few to time a prompt and 2 new"):
        fit_lengths(5, 5, 2)


def test_a_zero_byte_artifact_is_one_line(compress_here, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    for command in ("generate", "bench"):
        args = ("--prompt", "x") if command == "generate" else ()
        done = compress_here(command, str(tmp_path), *args)
        assert done.returncode == 2
        assert done.stderr == f"error: {tmp_path / 'model.onnx'}: not an ONNX model (it holds no graph)\n"

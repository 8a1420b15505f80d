"""EmbeddingTables: its checks, which tables it quantizes, and each ONNX lookup form under ONNX Runtime against
the dequantized table's rows."""
import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

from passes import quant_primitives as qp
from passes.quantize.embeddings import EmbeddingTables, lookup_nodes, quantize_tables, table_initializers
from passes.quantize.int_weights import IntWeights

from scheme_graphs import run_graph


@pytest.mark.parametrize("fields, message", [
    ({"embedding_bits": 6}, "embedding_bits must be 8, 4 or null"),
    ({"embedding_bits": 4, "embedding_block_size": 0}, "needs an embedding_block_size"),
    ({"embedding_block_size": 24}, "embedding_block_size must be 0"),
])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingTables(**fields)


@pytest.mark.parametrize("value", ["once", "", None, True])
def test_tied_table_is_copy_or_shared(value):
    from passes.quantize import QuantizeConfig

    with pytest.raises(ValueError, match="quantize.tied_table must be copy or shared"):
        QuantizeConfig(tied_table=value)
    assert QuantizeConfig(tied_table="shared").tied_table == "shared"


class _TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions, self.skipped = nn.Embedding(64, 32), nn.Embedding(16, 32), nn.Embedding(8, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.tokens.weight  # tied: left to the head's own codes


def test_untied_tables_not_ignored_are_quantized_in_place():
    model = _TwoTables()
    before = model.positions.weight.detach().clone()
    taken = {id(model.tokens.weight)}
    tables, records = quantize_tables(model, EmbeddingTables(8), ("skipped",), taken, {},
                                      lambda name, names, q: (name, names, q))
    assert list(tables) == ["positions"] and [r["module"] for r in records] == ["positions"]
    _, names, q = tables["positions"]
    assert names == ("positions.weight",)
    assert torch.equal(model.positions.weight.detach(), qp.dequantize(q))  # the module holds what the artifact does
    assert records[0]["relative_mse"] == pytest.approx(qp.relative_mse(before, qp.dequantize(q)))


@pytest.mark.parametrize("q_of, read_as", [
    (lambda t: EmbeddingTables(8).quantize(t), "gathered rows"),
    (lambda t: EmbeddingTables(4, 32).quantize(t), "GatherBlockQuantized"),
    (lambda t: IntWeights(bits=4, block_size=0, symmetric=False).quantize(t), "whole table"),
], ids=["int8-rows", "int4-B32", "int4-asym-channel"])
def test_each_lookup_returns_the_dequantized_rows(q_of, read_as):
    table = torch.randn(64, 32) * 0.2
    q = q_of(table)
    inits, attrs = table_initializers("table", q)
    gather = helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup")
    nodes, how = lookup_nodes("table", gather, q, inits[1], attrs)
    assert how == read_as
    ids = np.array([[0, 5, 63], [7, 7, 1]], np.int64)
    got = run_graph(nodes, inits, {"ids": ids}, "rows")
    np.testing.assert_allclose(got, qp.dequantize(q).numpy()[ids], rtol=0, atol=1e-7)


def _tied_graph(table: np.ndarray):
    """ids -> Gather(table) -> MatMul(rows, Transpose(table)) -> logits: a tied LM head the way the export writes it."""
    from onnx import TensorProto, numpy_helper

    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="head.Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["rows", "table_t"], ["logits"], name="head.MatMul")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", None])],
                              [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("scheme", [IntWeights(bits=4, block_size=32, full_range=True),
                                    IntWeights(bits=4, block_size=32, symmetric=False),
                                    IntWeights(bits=8, block_size=32), IntWeights(bits=8, block_size=0)],
                         ids=["int4-B32", "int4-asym", "int8-B32", "int8-channel"])
def test_a_shared_tied_table_is_stored_once_and_reads_the_same(scheme, tmp_path, optimized_ops):
    """tied_table=shared: the lookup reads the head's own codes through Transposes ONNX Runtime folds at session
    start; the logits equal the copy's (exact kernels), one set of codes is stored, and ORT's optimized graph is the
    copy's: the 4-bit head still a MatMulNBits (ORT 1.32 fuses no 8-bit DequantizeLinear of this tiny head)."""
    import onnx

    from compressor.ort_runtime import create_session
    from compressor.validate import EXACT_MATMULNBITS
    from exporters.qdq import lower_to_qdq
    from passes.quantize.record import QuantizedLayer

    torch.manual_seed(0)
    table = torch.randn(96, 64) * 0.1
    q = scheme.quantize(table)
    weight = qp.dequantize(q).numpy()
    ids = np.array([[0, 5, 95], [7, 7, 1]], np.int64)
    logits, codes, optimized = {}, {}, {}
    for mode in ("copy", "shared"):
        layer = QuantizedLayer("head", ("table",), q, scheme, tied_table=mode)
        proto, record = lower_to_qdq(_tied_graph(weight), {"head": layer})
        tied = next(e for e in record["lowered"] if e.get("tied_table"))
        assert ("stored_with" in tied) == (mode == "shared") and not record["left_fp32"]
        codes[mode] = sorted(t.name for t in proto.graph.initializer if t.name.endswith(".codes"))
        path = tmp_path / f"{mode}.onnx"
        onnx.save(proto, path)
        logits[mode] = create_session(path, options=EXACT_MATMULNBITS).run(["logits"], {"ids": ids})[0]
        optimized[mode], _ = optimized_ops(path, tmp_path)
    assert optimized["shared"] == optimized["copy"] and "Transpose" not in optimized["shared"]
    assert optimized["shared"]["MatMulNBits"] == (q.bits == 4), optimized["shared"]
    assert codes == {"copy": ["table.q.codes", "table.table_q.codes"], "shared": ["table.q.codes"]}
    np.testing.assert_array_equal(logits["shared"], logits["copy"])
    np.testing.assert_allclose(logits["shared"], weight[ids] @ weight.T, rtol=1e-5, atol=1e-5)


def test_the_quantize_pass_hands_tied_table_to_the_layer_records():
    """quantize.tied_table reaches the exporter through each layer's record (the default stays copy)."""
    from passes.quantize import QuantizeConfig, quantize_model

    for mode in ("copy", "shared"):
        model = _TwoTables()
        record = quantize_model(model, QuantizeConfig(bits=4, block_size=16, targets=("head",), tied_table=mode), [])
        assert record["quantized"]["head"].tied_table == mode
    assert QuantizeConfig().tied_table == "copy"

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

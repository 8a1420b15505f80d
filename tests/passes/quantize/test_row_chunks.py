"""Large weights are quantized, dequantized and scored a few rows at a time (passes.quantize.rows,
passes.quant_primitives.dequantize): the same bits as whole, for every scheme that claims its rows independent;
schemes that do not (GPTQ, per-tensor codebooks) are quantized whole."""
import dataclasses

import pytest
import torch

from passes import quant_primitives as qp
from passes.quantize import rows as row_chunks
from passes.quantize.codebook import CodebookWeights
from passes.quantize.int_weights import IntWeights

SCHEMES = [IntWeights(bits=4, block_size=32), IntWeights(bits=4, block_size=32, symmetric=False, full_range=False),
           IntWeights(bits=3, block_size=0), IntWeights(bits=4, block_size=32, zero_point="float", symmetric=False),
           IntWeights(bits=4, block_size=32, scale_search="mse"), CodebookWeights(dtype="nf", bits=4, block_size=32),
           CodebookWeights(dtype="kmeans", bits=3, block_size=0, codebook_scope="row")]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(s.label_parts()))
def test_quantized_in_row_chunks_equals_quantized_whole(scheme, monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(50, 64) * torch.rand(50, 1)
    whole = scheme.quantize(weight, None)
    monkeypatch.setattr(row_chunks, "ROW_CHUNK_WEIGHTS", 7 * 64)  # 8 chunks, the last one short
    monkeypatch.setattr(qp, "ROW_CHUNK_WEIGHTS", 7 * 64)
    assert scheme.rows_independent
    chunked = row_chunks.quantize_rows(lambda rows: scheme.quantize(rows, None), weight, scheme.rows_independent)
    assert chunked.codes.dtype == torch.int16 and torch.equal(chunked.codes.long(), whole.codes)
    for field in ("scales", "zero_points", "offsets", "codebook"):
        a, b = getattr(chunked, field), getattr(whole, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert torch.equal(qp.dequantize(chunked), qp._dequantize(whole))
    assert qp.relative_mse(weight, qp.dequantize(chunked)) == pytest.approx(
        float(((weight - qp._dequantize(whole)) ** 2).mean() / (weight ** 2).mean()), rel=1e-6)


def test_schemes_whose_rows_depend_on_each_other_are_quantized_whole():
    assert not IntWeights(bits=4, block_size=32, method="gptq").rows_independent
    assert not IntWeights(bits=4, block_size=-1).rows_independent
    assert not CodebookWeights(dtype="kmeans", bits=3, block_size=0).rows_independent
    assert dataclasses.replace(CodebookWeights(dtype="quantile", bits=4, block_size=0),
                               codebook_scope="row").rows_independent


def test_embedding_tables_quantized_in_row_chunks_equal_whole(monkeypatch):
    from torch import nn

    from passes.quantize.embeddings import EmbeddingTables, quantize_tables

    def quantized(chunk: int):
        monkeypatch.setattr(row_chunks, "ROW_CHUNK_WEIGHTS", chunk)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, 64))
        tables, _ = quantize_tables(model, EmbeddingTables(embedding_bits=4, embedding_block_size=32), (), set(),
                                    {}, lambda name, names, q: q)
        return tables["0"], model[0].weight

    (whole, whole_weight), (chunked, chunked_weight) = quantized(1 << 24), quantized(7 * 64)
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.scales, chunked.scales)
    assert torch.equal(whole_weight, chunked_weight)

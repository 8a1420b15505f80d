"""CodebookWeights: its checks, its quantizer against a brute-force nearest entry, its lowering under ONNX
Runtime."""
import numpy as np
import pytest
import torch

from passes import quant_primitives as qp
from passes.quantize.codebook import CodebookWeights

from scheme_graphs import EXACT, expanded_scales, lowered_matmul, relative_error

SCHEMES = [
    CodebookWeights("nf", 4, 32),
    CodebookWeights("log2", 3, 0),
    CodebookWeights("float", 5, 64, scale_dtype="float16"),
    CodebookWeights("quantile", 4, -1),
    CodebookWeights("kmeans", 3, 32, codebook_scope="row"),
]


@pytest.mark.parametrize("fields, message", [
    ({"dtype": "int"}, "codebook dtype must be one of"),
    ({"codebook_scope": "column"}, "codebook_scope must be tensor or row"),
    ({"dtype": "float", "bits": 3, "exponent_bits": 3}, "cannot have 3 exponent bits"),  # 1 sign bit: 2 are left
    ({"kmeans_iterations": 0}, "kmeans_iterations"),
])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CodebookWeights(**fields)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(s.label_parts()))
def test_each_weight_takes_its_nearest_entry(weight_and_input, scheme):
    """Brute force: each normalized weight's code is the index of the codebook entry nearest to it."""
    weight = torch.from_numpy(weight_and_input[0])
    q = scheme.quantize(weight)
    assert int(q.codes.max()) < 2 ** scheme.bits
    codebook = q.codebook if q.codebook.ndim == 2 else q.codebook[None, :].expand(weight.shape[0], -1)
    scales = expanded_scales(q, weight.shape)
    candidates = codebook[:, None, :] * scales[:, :, None]  # [N, K, C]: every entry at the weight's own scale
    nearest = (candidates - weight[:, :, None]).abs().min(dim=2).values
    assert bool(((qp.dequantize(q) - weight).abs() <= nearest + 1e-6).all())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{'-'.join(s.label_parts())}-{s.scale_dtype}")
def test_lowering_computes_the_dequantized_weight(weight_and_input, scheme):
    weight, x = weight_and_input
    q = scheme.quantize(torch.from_numpy(weight))
    expected = x.astype(np.float64) @ qp.dequantize(q).double().numpy().T
    assert relative_error(expected, lowered_matmul(scheme, q, x)) < EXACT

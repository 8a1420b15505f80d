"""A large weight quantized a few rows at a time, where its scheme quantizes each row on its own: the same bits,
with temporaries (several fp32 and int64 copies of the weight) that follow the chunk, not the weight (a
150k-vocabulary head is 233M weights: 5.5 GB of temporaries quantized whole)."""
import dataclasses
from collections.abc import Callable

import torch

from passes import quant_primitives as qp

ROW_CHUNK_WEIGHTS = 1 << 24  # weights per call


def quantize_rows(quantize: Callable[[torch.Tensor], qp.Quantized], weight: torch.Tensor,
                  rows_independent: bool) -> qp.Quantized:
    """quantize(weight), a few rows at a time when `rows_independent` (each row's groups quantized elementwise);
    the codes as int16 then, the form they wait in for the exporter."""
    rows = max(1, ROW_CHUNK_WEIGHTS // max(1, weight.shape[1]))
    if weight.shape[0] <= rows or not rows_independent:
        return quantize(weight)
    parts = []
    for start in range(0, weight.shape[0], rows):
        q = quantize(weight[start:start + rows])
        parts.append(dataclasses.replace(q, codes=q.codes.to(torch.int16)))

    def joined(field: str):
        values = [getattr(q, field) for q in parts]
        return None if values[0] is None else torch.cat(values)

    codebook = parts[0].codebook
    if codebook is not None and codebook.dim() == 2:  # one codebook per row
        codebook = joined("codebook")
    return dataclasses.replace(parts[0], codes=joined("codes"), scales=joined("scales"),
                               zero_points=joined("zero_points"), offsets=joined("offsets"), codebook=codebook)

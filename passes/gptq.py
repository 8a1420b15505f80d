"""GPTQ (Frantar et al. 2022): quantize one input column at a time and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian H = 2 X Xᵀ of the layer's calibration inputs.
Int types only; group scales are fixed when the sweep reaches a group's first column."""
import torch

from passes.quant_primitives import (PER_CHANNEL, PER_TENSOR, Quantized, group_size, int_codes_from_scale,
                                     quantize_int_asymmetric, quantize_int_symmetric)

LAZY_BATCH = 128  # columns updated together (the reference implementation's block)


def _group_params(weight: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, full_range: bool):
    """Scale (and zero point) of one [N, G] slice, one group per row, exactly as the RTN quantizer picks them."""
    if symmetric:
        q = quantize_int_symmetric(weight, bits, PER_CHANNEL, scale_dtype, full_range)
    else:
        q = quantize_int_asymmetric(weight, bits, PER_CHANNEL, scale_dtype)
    return q.scales.float(), q.zero_points


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, symmetric: bool,
                  scale_dtype: torch.dtype = torch.float32, damp: float = 0.01, full_range: bool = False) -> Quantized:
    """weight [N, K], hessian [K, K] (sum of x xᵀ over calibration tokens; the scale of H does not matter)."""
    if block_size == PER_TENSOR:
        raise ValueError("GPTQ needs per-channel or block-wise scales, not per-tensor")
    weight = weight.double().clone()
    rows, cols = weight.shape
    group = group_size((rows, cols), block_size)
    hessian = hessian.double().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += damp * torch.mean(torch.diag(hessian)) * torch.eye(cols, dtype=torch.float64)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.float64)
    n_groups = cols // group
    scales = torch.zeros(rows, n_groups, dtype=torch.float64)
    zeros = None if symmetric else torch.zeros(rows, n_groups, dtype=torch.long)
    batch = max(LAZY_BATCH, group) if group < cols else LAZY_BATCH
    for start in range(0, cols, batch):
        stop = min(start + batch, cols)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        inv_block = inverse[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group == 0:  # a new group starts: fix its scale from the error-updated weights
                current = torch.cat([block[:, i:], weight[:, stop:]], dim=1)[:, :group]
                scale, zero = _group_params(current.float(), bits, symmetric, scale_dtype, full_range)
                scales[:, column // group] = scale[:, 0].double()
                if zeros is not None:
                    zeros[:, column // group] = zero[:, 0]
            g = column // group
            zero_col = None if zeros is None else zeros[:, g].double()
            q = int_codes_from_scale(block[:, i], scales[:, g], zero_col, bits, full_range)
            codes[:, column] = q
            dequant = (q - (0 if zero_col is None else zero_col)) * scales[:, g]
            error = (block[:, i] - dequant) / inv_block[i, i]
            block[:, i:] -= error[:, None] * inv_block[i, i:][None, :]
            errors[:, i] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    return Quantized(codes.long(), scales.to(scale_dtype), zeros, None, bits, block_size)

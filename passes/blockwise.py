"""Block-sequential calibration, as GPTQ runs on large models: the calibration batches' inputs to the first
transformer block are captured once; then block by block, the Linear layers' input statistics are gathered by
replaying only that block, its layers are quantized, and the block's outputs (through the quantized weights)
become the next block's inputs. Each layer sees its inputs as the already-quantized layers below shape them, at
the cost of about two forward passes in all instead of one per layer."""
import torch
from torch import nn

from passes.calibration import input_second_moments


class _Captured(Exception):
    pass


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The longest nn.ModuleList whose every item holds Linear layers (GPT samples' and HF models' layers)."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and all(
                any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            if best is None or len(module) > len(best):
                best = module
    return best


def _first_block_inputs(model: nn.Module, block: nn.Module, calibration: list[tuple]) -> list[tuple]:
    captured = []

    def capture(_, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured  # the rest of the model is not needed

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in calibration:
            try:
                model(*batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def quantize_blockwise(model: nn.Module, chosen: list[tuple[str, nn.Linear]], calibration: list[tuple],
                       quantize_layer, progress_bar=None) -> list[tuple[str, nn.Linear]]:
    """Calls quantize_layer(name, module, hessian) for every chosen layer inside the transformer blocks, block by
    block; returns the chosen layers outside the blocks (e.g. lm_head), left for the caller."""
    blocks = transformer_blocks(model)
    if blocks is None:
        return chosen
    inputs = _first_block_inputs(model, blocks[0], calibration)
    outside = list(chosen)
    for block in blocks:
        members = {id(m) for m in block.modules()}
        inside = [(name, module) for name, module in outside if id(module) in members]
        outside = [(name, module) for name, module in outside if id(module) not in members]
        if inside:
            replay = [(i,) for i in range(len(inputs))]
            hessians = input_second_moments(lambda i: block(*inputs[i][0], **inputs[i][1]),
                                            [module for _, module in inside], replay)
            for (name, module), hessian in zip(inside, hessians):
                quantize_layer(name, module, hessian)
                if progress_bar is not None:
                    progress_bar.update(1)
        outputs = [block(*args, **kwargs) for args, kwargs in inputs]
        inputs = [_with_hidden(args, kwargs, out[0] if isinstance(out, tuple) else out)
                  for (args, kwargs), out in zip(inputs, outputs)]
    return outside

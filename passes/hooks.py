"""Forward pre-hooks for the length of a block: how passes watch or change what a layer reads (calibration
statistics, fake-quantized inputs, SmoothQuant's division)."""
import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def forward_pre_hooks(pairs):
    """Forward pre-hooks [(module, hook)] for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _divide_by(smooth: torch.Tensor):
    def hook(_, args):
        return (args[0] / smooth.to(args[0].dtype),) + tuple(args[1:])
    return hook


def dividing_inputs(layers: dict[str, nn.Linear], smooth: dict[str, torch.Tensor]):
    """Context: the smoothed layers see x / s (their weights hold W * s), e.g. while GPTQ measures inputs."""
    return forward_pre_hooks([(layers[name], _divide_by(s)) for name, s in smooth.items()])


def run_batches(model: nn.Module, batches: list[tuple]) -> None:
    """The model's forward over calibration batches, for what hooks record."""
    with torch.no_grad():
        for batch in batches:
            model(*batch)

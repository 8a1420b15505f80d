"""A torch model as a logits function, the shape compressor.tasks' evaluate() takes: what an input adapter
scores its model with, before and after each pass."""
import numpy as np
import torch
from torch import nn

from passes.quantize.activations import fake_quantized_activations


def torch_logits_fn(model: nn.Module, input_names: tuple[str, ...], quantized: dict | None = None):
    """The model's logits; layers whose quantize record quantizes their input see it fake-quantized."""
    @torch.no_grad()
    def run(inputs: dict) -> np.ndarray:
        with fake_quantized_activations(model, quantized or {}):
            return model(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names)).float().numpy()

    return run

"""An nn.Module handed to the Python API (compressor.compress) as the input: one of the sample families' modules
(samples.registry.FAMILIES), read as if from its checkpoint folder. The passes work on a copy, so the caller's
module is left as it was."""
import copy
import dataclasses
import hashlib
from pathlib import Path

import torch
from torch import nn

from compressor.errors import UserError
from compressor.inputs.source import Checkpoint, InputAdapter
from compressor.inputs.torch_source import torch_source
from samples.registry import FAMILIES


def module_family(model: nn.Module) -> str:
    """The sample family whose module `model` is; UserError for any other module."""
    for family, (_, module_type) in FAMILIES.items():
        if type(model) is module_type:
            return family
    raise UserError(f"compress() takes an nn.Module of the sample families ({', '.join(FAMILIES)}), not "
                    f"{type(model).__name__}: save other models as a Hugging Face folder or ONNX file and pass its path")


def state_sha256(model: nn.Module) -> str:
    """sha256 over the module's tensors (names, dtypes, shapes, bytes) in state_dict order: what a checkpoint's
    file hash is for a folder."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_adapter(model: nn.Module, name: str) -> InputAdapter:
    family = module_family(model)

    def load(path: Path, progress: bool = False):
        working = copy.deepcopy(model).eval()
        checkpoint = Checkpoint(name=name, family=family, config=dataclasses.asdict(model.config), model=working,
                                weights_path=Path(name), weights_sha256=state_sha256(model), metadata={})
        return torch_source(checkpoint, Path(f"<nn.Module {type(model).__name__}>"), "nn-module")

    return InputAdapter("nn-module", lambda path: True, lambda path: None, load)

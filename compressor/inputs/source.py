"""What an input adapter hands the pipeline: one value per input model, whatever file it came from."""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from torch import nn

from compressor.tasks.protocol import LogitsFn, Task


@dataclass
class Checkpoint:
    name: str
    family: str
    config: dict
    model: nn.Module
    weights_path: Path
    weights_sha256: str
    metadata: dict  # the whole config.json (training record etc.)


@dataclass
class Source:
    name: str
    task: Task  # data, metric, inputs
    config: dict  # what the task needs of the model (context, vocabulary, tokenizer, ...)
    model: nn.Module  # the torch model, or an ONNX graph's weights as nn.Linear shells; passes rewrite it in place
    record: dict  # the report's `model` entry: name, family, source, sha256, config, input_format
    metadata: dict[str, str]  # carried into the artifact's metadata_props
    # the working model (after passes, with the quantize pass's records) -> its logits function
    logits_fn: Callable[[nn.Module, dict], LogitsFn]
    # the working model -> the fp32 ONNX graph the exporter lowers (task inputs give shapes and dynamic axes)
    export: Callable[[nn.Module, dict, bool], onnx.ModelProto]
    # total model bits of the working model, counted as the artifact will store it
    bits: Callable[[nn.Module, dict], dict]
    reference_fn: LogitsFn | None = None  # the input model's logits when not logits_fn(model) before any pass
    generates: bool = False  # exported as a decoder with a KV cache: generation speed is measured
    notes: tuple[str, ...] = ()  # one line each for the run's log: what the adapter did to the input

    @property
    def family(self) -> str:
        return self.record["family"]


@dataclass(frozen=True)
class InputAdapter:
    """One kind of input: how to recognise it, what can be checked before its weights load, how to load it."""
    kind: str
    accepts: Callable[[Path], bool]
    skeleton: Callable[[Path], nn.Module | None]  # layer shapes on the meta device, or None (known after loading)
    load: Callable[[Path, bool], Source]
    passes: tuple[str, ...] | None = None  # the passes it can take; None: every pass
    calibrates: bool = True  # whether calibration batches can reach its layers (GPTQ, Wanda, ...)

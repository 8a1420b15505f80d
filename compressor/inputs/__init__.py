"""Input adapters: each turns a path into one Source the pipeline consumes (compressor.inputs.source).

In the order they are asked: an fp32 ONNX model, a Hugging Face folder or GGUF file, our own checkpoint folder
(or the name of a shipped sample)."""
from pathlib import Path

from compressor.inputs.checkpoint import checkpoint_source, is_checkpoint, model_skeleton, resolve_sample
from compressor.inputs.hf import hf_model_skeleton, hf_source, is_hf_checkpoint
from compressor.inputs.onnx import PASSES as ONNX_PASSES
from compressor.inputs.onnx import is_onnx_input, onnx_source
from compressor.inputs.source import InputAdapter, Source

ADAPTERS = (
    InputAdapter("onnx", is_onnx_input, lambda path: None, onnx_source, passes=ONNX_PASSES, calibrates=False),
    InputAdapter("hugging-face", is_hf_checkpoint, hf_model_skeleton, hf_source),
    InputAdapter("checkpoint", is_checkpoint, model_skeleton, checkpoint_source),
)


def adapter_for(path: Path) -> tuple[Path, InputAdapter]:
    """The path (a sample name resolved to its shipped folder) and the first adapter that accepts it."""
    path = resolve_sample(Path(path))
    return path, next(adapter for adapter in ADAPTERS if adapter.accepts(path))


__all__ = ["ADAPTERS", "InputAdapter", "Source", "adapter_for"]

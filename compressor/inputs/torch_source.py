"""A loaded torch checkpoint (ours or Hugging Face's) as a Source: scored by its forward, exported as a KV-cache
decoder graph where compressor.inputs.decoders knows the model (else by torch.onnx.export), bits counted on its
parameters."""
from pathlib import Path

from compressor.inputs.decoders import as_decoder, is_decoder
from compressor.inputs.source import Checkpoint, Source
from compressor.tasks import TASKS
from compressor.torch_logits import torch_logits_fn
from exporters import metadata_keys
from exporters.decoder_graph import build_decoder_graph
from exporters.onnx_export import export_onnx
from passes.model_bits import total_model_bits


def torch_source(checkpoint: Checkpoint, path: Path, input_format: str) -> Source:
    task = TASKS[checkpoint.family]
    config = checkpoint.config

    def export(model, sample_inputs: dict, progress: bool):
        decoder = as_decoder(model)
        if decoder is not None:
            return build_decoder_graph(decoder)
        return export_onnx(model, sample_inputs, task.dynamic_axes(config), task.OUTPUT_NAME, progress=progress)

    record = {"name": checkpoint.name, "family": checkpoint.family, "source": str(path),
              "source_sha256": checkpoint.weights_sha256, "config": config, "input_format": input_format}
    return Source(name=checkpoint.name, task=task, config=config, model=checkpoint.model, record=record,
                  metadata={metadata_keys.SOURCE: checkpoint.name,
                            metadata_keys.SOURCE_SHA256: checkpoint.weights_sha256},
                  logits_fn=lambda model, quantized: torch_logits_fn(model, task.INPUT_NAMES, quantized),
                  export=export, bits=total_model_bits, generates=is_decoder(checkpoint.model))

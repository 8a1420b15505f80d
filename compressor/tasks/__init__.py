"""One module per model family says how to feed, evaluate and benchmark it. Each module exposes:

METRIC, HIGHER_IS_BETTER, INPUT_NAMES, OUTPUT_NAME
dynamic_axes(config) -> {input name: {axis: (dim name, max size)}}
heldout_data(config, limit) -> held-out data (never the training or calibration data)
evaluate(logits_fn, data, progress) -> the metric; logits_fn maps {input name: int64 array} -> logits array
parity_inputs(data) -> a fixed input batch whose logits torch and ONNX Runtime must agree on
benchmark_inputs(config, batch_size) -> a batch of the family's working shape for latency runs
calibration_data(config, samples, seed) -> model-argument tuples from the training distribution
"""
from types import ModuleType

from compressor.tasks import language_modeling, seq2seq_reverse

TASKS: dict[str, ModuleType] = {"gpt": language_modeling, "seq2seq": seq2seq_reverse}

"""One module per model family says how to feed, evaluate and benchmark it. Each module exposes:

METRIC, HIGHER_IS_BETTER, INPUT_NAMES, OUTPUT_NAME
dynamic_axes(config) -> {input name: {axis: (dim name, max size)}}
heldout_data(config, limit) -> held-out data (never the training or calibration data)
evaluate(logits_fn, data, progress) -> the metric; logits_fn maps {input name: int64 array} -> logits array
parity_inputs(data) -> a fixed input batch whose logits torch and ONNX Runtime must agree on
benchmark_inputs(config, batch_size) -> a batch of the family's working shape for latency runs
calibration_data(config, samples, seed) -> model-argument tuples from the training distribution

Optional: fit_reference(logits_fn, data, progress) is called once with the input model before anything is
scored (e.g. to train a probe on its embeddings); evaluate_all(logits_fn, data, progress) -> {metric: value}
adds side metrics to the main one; task_state(data) / restore_state(data, state) carry what fit_reference
learned inside the artifact so `compress check` can score it later.
"""
from types import ModuleType

from compressor.tasks import hf_language_modeling, language_modeling, sentence_embedding, seq2seq_reverse

TASKS: dict[str, ModuleType] = {"gpt": language_modeling, "seq2seq": seq2seq_reverse,
                                "hf-causal-lm": hf_language_modeling, "hf-encoder": sentence_embedding}


def measure(task: ModuleType, logits_fn, data, progress: bool = False) -> dict:
    """{metric: value} for the task's main metric, plus its side metrics where it has some."""
    if hasattr(task, "evaluate_all"):
        return task.evaluate_all(logits_fn, data, progress)
    return {task.METRIC: task.evaluate(logits_fn, data, progress)}


def worsening(reference: float, measured: float, higher_is_better: bool) -> float:
    """How much worse `measured` is than `reference`, positive = worse: absolute where higher is better (accuracy
    and exact match are fractions), relative where lower is (perplexity: its scale is the model's)."""
    return reference - measured if higher_is_better else (measured - reference) / reference

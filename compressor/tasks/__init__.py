"""One module per model family says how to feed, evaluate and benchmark it; compressor.tasks.protocol declares
what each module provides (Task; ReferenceTask for those that learn from the input model)."""
from compressor.tasks import hf_language_modeling, language_modeling, sentence_embedding, seq2seq_reverse
from compressor.tasks.protocol import Task

TASKS: dict[str, Task] = {"gpt": language_modeling, "seq2seq": seq2seq_reverse,
                          "hf-causal-lm": hf_language_modeling, "hf-encoder": sentence_embedding}


def measure(task: Task, logits_fn, data, progress: bool = False) -> dict:
    """{metric: value} for the task's main metric, plus its side metrics where it has some."""
    return task.evaluate_all(logits_fn, data, progress)


def worsening(reference: float, measured: float, higher_is_better: bool) -> float:
    """How much worse `measured` is than `reference`, positive = worse: absolute where higher is better (accuracy
    and exact match are fractions), relative where lower is (perplexity: its scale is the model's)."""
    return reference - measured if higher_is_better else (measured - reference) / reference

"""What a task module declares (each module in compressor.tasks.TASKS satisfies `Task`; a module is an object
whose attributes are its constants and functions). Code reads these members, never probes for them: a task that
learns from the input model says so with FITS_REFERENCE and then also provides `ReferenceTask`'s members."""
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

LogitsFn = Callable[[dict], np.ndarray]  # {input name: int64 array} -> logits (or embeddings) array


class Task(Protocol):
    METRIC: str  # the main metric's name, e.g. perplexity
    HIGHER_IS_BETTER: bool  # its direction: the one place it is stated (compressor.tasks.worsening reads it)
    INPUT_NAMES: tuple[str, ...]
    OUTPUT_NAME: str
    # learns from the input model before anything is scored (ReferenceTask): reference metrics cannot be reused
    # from another run, and what it learned travels in the artifact (compressor.task_state) for `compress check`
    FITS_REFERENCE: bool

    def dynamic_axes(self, config: dict) -> dict:
        """{input name: {axis: (dim name, max size)}}"""

    def heldout_data(self, config: dict, limit: int | None = None) -> Any:
        """Held-out data: never the training or calibration data."""

    def evaluate(self, logits_fn: LogitsFn, data, progress: bool = False) -> float:
        """The main metric. Decoders' batches hold their logits to compressor.tasks.logits_budget."""

    def evaluate_all(self, logits_fn: LogitsFn, data, progress: bool = False) -> dict:
        """{METRIC: value, side metric: value, ...}: the main metric and whatever else one pass over the data gives."""

    def parity_inputs(self, data) -> dict[str, np.ndarray]:
        """A fixed input batch whose logits torch and ONNX Runtime must agree on (decoders: as many windows as
        compressor.tasks.logits_budget allows, up to their usual count)."""

    def benchmark_inputs(self, config: dict, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the family's working shape for latency runs."""

    def output_bytes(self, config: dict, inputs: dict[str, np.ndarray]) -> int:
        """Bytes of the fp32 output the model gives for `inputs` (e.g. benchmark_inputs' logits): a latency batch
        over compressor.tasks.logits_budget is not run."""

    def calibration_data(self, config: dict, samples: int, seed: int = 0) -> list[tuple]:
        """Model-argument tuples from the training distribution."""


class ReferenceTask(Task, Protocol):
    """A task with FITS_REFERENCE = True (e.g. a probe trained on the input model's embeddings)."""

    def fit_reference(self, logits_fn: LogitsFn, data, progress: bool = False) -> None:
        """Called once with the input model, before anything is scored."""

    def task_state(self, data) -> dict:
        """What fit_reference learned, as JSON values: the artifact carries it."""

    def restore_state(self, data, state: dict, output_width: int | None) -> None:
        """Put task_state's result back into `data`. `output_width`: the graph's last output dimension where it
        states one. KeyError / TypeError / ValueError: the state lacks what the task needs; UnusableState: it has
        it, but no usable value."""


class UnusableState(ValueError):
    """restore_state's refusal of a state that is well-formed but cannot score the graph; the message says why."""

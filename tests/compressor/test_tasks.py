"""Every task module is what compressor.tasks.protocol declares: the pipeline, the validator and `compress check`
read these members and never probe for them, so a module that lacks one must fail here, not mid-run."""
import inspect

import pytest

from compressor.tasks import TASKS, worsening
from compressor.tasks.protocol import ReferenceTask, Task


def _declared(protocol) -> dict[str, object]:
    """The protocol's own members: annotated constants (with their types) and methods."""
    members = {name: kind for name, kind in protocol.__dict__.get("__annotations__", {}).items()}
    members.update({name: inspect.signature(value) for name, value in protocol.__dict__.items()
                    if inspect.isfunction(value) and not name.startswith("_")})
    return members


@pytest.mark.parametrize("family", sorted(TASKS))
def test_task_modules_provide_the_declared_members(family):
    task = TASKS[family]
    protocols = (Task, ReferenceTask) if task.FITS_REFERENCE else (Task,)
    for protocol in protocols:
        for name, declared in _declared(protocol).items():
            assert hasattr(task, name), f"{task.__name__} lacks {protocol.__name__}.{name}"
            value = getattr(task, name)
            if isinstance(declared, inspect.Signature):  # same arity as declared (self aside)
                assert callable(value) and len(inspect.signature(value).parameters) >= len(declared.parameters) - 1, name
            elif declared is bool:
                assert isinstance(value, bool), name
    if not task.FITS_REFERENCE:  # a fit_reference here would never be called
        assert not any(hasattr(task, name) for name in _declared(ReferenceTask)), task.__name__


def test_worsening_is_absolute_for_scores_and_relative_for_perplexity():
    assert worsening(0.90, 0.85, higher_is_better=True) == pytest.approx(0.05)
    assert worsening(0.90, 0.95, higher_is_better=True) == pytest.approx(-0.05)
    assert worsening(20.0, 21.0, higher_is_better=False) == pytest.approx(0.05)
    assert worsening(20.0, 19.0, higher_is_better=False) == pytest.approx(-0.05)

"""evomerge.runtime.factory: the run config picks the executor; a custom evaluator is the caller's choice."""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest
from fake_evaluators import recipe_for

from evomerge.eval.tasks import Objective
from evomerge.runtime import InProcessExecutor, Job, make_executor
from evomerge.search.config import RuntimeConfig


def fake_run(**runtime) -> SimpleNamespace:
    """The parts of a ``ResolvedRun`` that ``make_executor`` reads."""
    return SimpleNamespace(
        config=SimpleNamespace(runtime=RuntimeConfig(**runtime)),
        base_dir="/",
        objectives=[Objective(task="t1", metric="acc", name="first")],
        include_paths=[],
    )


def test_workers_0_is_in_process_and_the_evaluator_factory_is_a_keyword():
    executor = make_executor(fake_run(workers=0), evaluator_factory="fake_evaluators:quadratic")
    try:
        assert isinstance(executor, InProcessExecutor)
        assert executor.spec.factory == "fake_evaluators:quadratic" and executor.spec.base_dir == "/"
        assert executor.spec.objectives == [Objective(task="t1", metric="acc", name="first").model_dump()]
        executor.submit(Job(0, recipe_for("x")))
        assert executor.next_outcome().result.ok
    finally:
        executor.shutdown()


def test_a_run_config_cannot_name_an_evaluator_factory():
    with pytest.raises(pydantic.ValidationError, match="evaluator_factory"):
        RuntimeConfig(workers=0, evaluator_factory="fake_evaluators:quadratic")

"""What executors exchange with the search driver and with their workers, and the one way a job is run.

The driver hands an :class:`Executor` :class:`Job` s (a recipe dict and an id) and gets back
:class:`Outcome` s; a worker builds its evaluator once from an :class:`EvaluatorSpec` and runs each
job with :func:`run_job`. Only these small, picklable things cross process boundaries: weights never
go through Ray's object store.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from evomerge.eval.result import CandidateResult

__all__ = ["EvaluatorSpec", "Executor", "Job", "Outcome", "import_callable", "recipe_hash", "run_job"]


@dataclass(frozen=True)
class EvaluatorSpec:
    """Everything a worker needs to build its evaluator; small and picklable, so it can travel to Ray actors."""

    objectives: list[dict]
    """``Objective.model_dump()`` dicts."""
    include_paths: list[str] = field(default_factory=list)
    backend: str = "fast"
    device: str | None = None
    """``None``: CUDA when the worker sees a GPU, else CPU."""
    resident_sources: str = "auto"
    """Keep the sources' tensors on the device between candidates: auto (on CUDA, when they fit), on, off."""
    score_dtype: str = "auto"
    """The resident model's dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
    buffers: int = 1
    """Resident models per layer count: 2 when the worker runs two candidates at once (``runtime.overlap``)."""
    seed: int = 0
    threads: int | None = None
    """``torch.set_num_threads`` in the worker; ``None``: the CPUs reserved per worker (Ray) or
    left as it is (in-process)."""
    base_dir: str | None = None
    """Directory that relative model paths in recipes are resolved against (workers on other
    machines have another working directory; prefer absolute paths)."""
    factory: str | None = None
    """``"module:function"``; when set, ``build`` returns ``function(spec)`` instead of a
    ``CandidateEvaluator`` (anything with ``evaluate(recipe) -> CandidateResult``; tests use this).
    A path, not a callable, so that a worker in another process can import it. With ``buffers=2`` a Ray
    worker calls it from two threads at once (``runtime.overlap``), so it must be thread-safe."""

    def build(self) -> Any:
        """The evaluator this spec describes (a ``CandidateEvaluator`` unless ``factory`` is set)."""
        if self.factory:
            return import_callable(self.factory)(self)
        from evomerge.eval.evaluator import CandidateEvaluator
        from evomerge.eval.tasks import Objective

        return CandidateEvaluator(
            [Objective.model_validate(o) for o in self.objectives],
            include_paths=list(self.include_paths),
            backend=self.backend,  # type: ignore[arg-type]
            device=self.device,
            score_dtype=self.score_dtype,
            resident_sources=self.resident_sources,
            buffers=self.buffers,
            seed=self.seed,
            base_dir=Path(self.base_dir) if self.base_dir else None,
        )


def import_callable(path: str) -> Any:
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"factory {path!r}: expected 'module:function'")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"factory {path!r} is not callable")
    return obj


@dataclass(frozen=True)
class Job:
    """One candidate to score."""

    candidate_id: int
    recipe: dict
    """``Recipe.to_dict()``; the worker rebuilds the ``Recipe``."""
    attempt: int = 0
    fidelity: str = "full"
    """``full`` (every configured item) or ``screen`` (each screened objective's subset)."""


@dataclass
class Outcome:
    """A finished job: its (last) attempt, the result and the worker that produced it."""

    job: Job
    result: CandidateResult
    worker: str


@runtime_checkable
class Executor(Protocol):
    """The interface the search driver needs: submit jobs, take outcomes as each finishes (no barrier).

    ``capacity`` is how many jobs can run at once (the driver keeps that many in flight);
    ``next_outcome`` returns ``None`` after ``timeout`` seconds or when nothing is pending;
    ``pending`` counts jobs whose outcome has not been taken; ``idle_fraction`` is the share of
    worker time without a job since the first submit (for benchmarks and logs).
    """

    @property
    def capacity(self) -> int:
        """How many jobs may be in flight at once (live workers)."""
        ...

    def submit(self, job: Job) -> None: ...

    def next_outcome(self, timeout: float | None = None) -> Outcome | None: ...

    def pending(self) -> int: ...

    def idle_fraction(self) -> float: ...

    def shutdown(self) -> None: ...


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """The recipe's content hash (as ``Recipe.content_hash``), also for recipes that do not validate,
    so that a failed candidate is still recorded under a stable key."""
    from evomerge.recipe import RecipeError, candidate_from_dict
    from evomerge.recipe.schema import content_hash

    try:
        return candidate_from_dict(recipe).content_hash()
    except RecipeError:
        return content_hash(recipe)


def run_job(evaluator: Any, job: Job) -> CandidateResult:
    """Evaluate one job; never raises (an invalid recipe or a raising evaluator is a failed result),
    so that one bad candidate cannot take a worker, or the in-process driver, down with it."""
    from evomerge.recipe import RecipeError, candidate_from_dict

    start = time.perf_counter()
    try:
        recipe = candidate_from_dict(job.recipe, source=f"candidate {job.candidate_id}")
    except RecipeError as exc:
        return CandidateResult(
            recipe_hash(job.recipe),
            "failed",
            reason=str(exc),
            seconds=time.perf_counter() - start,
            fidelity="screen" if job.fidelity == "screen" else "full",
        )
    try:
        if job.fidelity == "full":  # the plain call: evaluators without fidelities (tests' fakes) still work
            return evaluator.evaluate(recipe)
        return evaluator.evaluate(recipe, fidelity=job.fidelity)
    except Exception as exc:  # evaluators should not raise; if one does, it is this candidate's failure
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
        return CandidateResult(
            recipe.content_hash(),
            "failed",
            reason=f"{type(exc).__name__}: {exc}{where}",
            seconds=time.perf_counter() - start,
            fidelity="screen" if job.fidelity == "screen" else "full",
        )

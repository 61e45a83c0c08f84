"""``make_executor``: the executor a resolved run config asks for, so the CLI and scripts build it one way."""

from __future__ import annotations

from typing import Any

from evomerge.runtime.inprocess import InProcessExecutor
from evomerge.runtime.jobs import EvaluatorSpec, Executor
from evomerge.runtime.ray_pool import RayExecutor

__all__ = ["make_executor", "overlap_lanes"]


def make_executor(run: Any, *, address: str | None = None, evaluator_factory: str | None = None) -> Executor:
    """The executor a run config asks for: in-process (workers: 0) or a pool of Ray actors.

    ``run`` is a ``ResolvedRun`` (``evomerge.search.config``); ``address`` joins that Ray cluster
    instead of starting a local one. ``evaluator_factory`` (``"module:function"``, see
    ``EvaluatorSpec.factory``) replaces the ``CandidateEvaluator`` by what that function builds: a
    hook for tests and experiments, kept out of the run config so that configs only say what to search.
    """
    runtime = run.config.runtime
    lanes = overlap_lanes(runtime.overlap, runtime.gpus_per_worker) if runtime.workers != 0 else 1
    spec = EvaluatorSpec(
        objectives=[o.model_dump() for o in run.objectives],
        include_paths=list(run.include_paths),
        backend=runtime.backend,
        device=runtime.device,
        score_dtype=runtime.score_dtype,
        resident_sources=runtime.resident_sources,
        buffers=lanes,
        base_dir=str(run.base_dir),
        factory=evaluator_factory,
    )
    if runtime.workers == 0:
        return InProcessExecutor(spec)
    return RayExecutor(
        spec,
        runtime.workers,
        address=address,
        gpus_per_worker=runtime.gpus_per_worker,
        cpus_per_worker=runtime.cpus_per_worker,
        timeout=runtime.timeout,
        lanes=lanes,
    )


def overlap_lanes(overlap: str, gpus_per_worker: float) -> int:
    """Candidates a Ray worker takes at once for ``runtime.overlap``: 2 (merge one while scoring the other)
    when ``on``, or ``auto`` on GPU workers; else 1."""
    if overlap not in ("auto", "on", "off"):
        raise ValueError(f"runtime.overlap: {overlap!r} is not valid; use auto, on or off")
    return 2 if overlap == "on" or (overlap == "auto" and gpus_per_worker > 0) else 1

"""Where candidates are evaluated: Ray actors that each own one evaluator, or the driver process itself."""

from evomerge.runtime.executor import (
    EvaluatorSpec,
    Executor,
    InProcessExecutor,
    Job,
    Outcome,
    RayExecutor,
    connect_ray,
    make_executor,
    start_local_ray,
)

__all__ = [
    "EvaluatorSpec",
    "Executor",
    "InProcessExecutor",
    "Job",
    "Outcome",
    "RayExecutor",
    "connect_ray",
    "make_executor",
    "start_local_ray",
]

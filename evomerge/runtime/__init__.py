"""Where candidates are evaluated: Ray actors that each own one evaluator, or the driver process itself.

* :mod:`~evomerge.runtime.jobs`: ``Job``, ``Outcome``, ``EvaluatorSpec``, ``run_job``, the ``Executor`` interface
* :mod:`~evomerge.runtime.inprocess`: ``InProcessExecutor`` (``--workers 0``)
* :mod:`~evomerge.runtime.ray_pool`: ``RayExecutor``, a pool of Ray actors
* :mod:`~evomerge.runtime.local_ray`: ``connect_ray`` / ``start_local_ray`` (a private Ray on 127.0.0.1 only)
* :mod:`~evomerge.runtime.factory`: ``make_executor``, the executor a run config asks for
"""

from evomerge.runtime.factory import make_executor
from evomerge.runtime.inprocess import InProcessExecutor
from evomerge.runtime.jobs import EvaluatorSpec, Executor, Job, Outcome, recipe_hash, run_job
from evomerge.runtime.local_ray import connect_ray, machine_cpus, start_local_ray
from evomerge.runtime.ray_pool import RayExecutor

__all__ = [
    "EvaluatorSpec",
    "Executor",
    "InProcessExecutor",
    "Job",
    "Outcome",
    "RayExecutor",
    "connect_ray",
    "machine_cpus",
    "make_executor",
    "recipe_hash",
    "run_job",
    "start_local_ray",
]

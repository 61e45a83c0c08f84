"""The in-process executor (``--workers 0``): jobs run in the driver process, one at a time.

For debugging and for deterministic benchmarks: no Ray, no other process, the evaluator's
tracebacks and prints land in the driver's terminal.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from evomerge.runtime.jobs import EvaluatorSpec, Job, Outcome, run_job

__all__ = ["InProcessExecutor"]


class InProcessExecutor:
    """Runs each job synchronously inside ``submit`` in this process (debugging, ``--workers 0``)."""

    worker_name = "inprocess"

    def __init__(self, spec: EvaluatorSpec, evaluator: Any = None):
        """Build the evaluator from ``spec`` (or use ``evaluator``, already built) once, for every job."""
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.evaluator = evaluator if evaluator is not None else spec.build()
        self.capacity = 1
        self._outcomes: collections.deque[Outcome] = collections.deque()
        self._t0: float | None = None
        self._busy = 0.0
        self._closed = False

    def submit(self, job: Job) -> None:
        """Evaluate ``job`` now; its outcome waits for ``next_outcome``."""
        if self._closed:
            raise RuntimeError("executor is shut down")
        start = time.monotonic()
        if self._t0 is None:
            self._t0 = start
        result = run_job(self.evaluator, job)
        self._busy += time.monotonic() - start
        self._outcomes.append(Outcome(job, result, self.worker_name))

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        """The oldest outcome not taken yet; never waits (every job finished inside ``submit``)."""
        return self._outcomes.popleft() if self._outcomes else None

    def pending(self) -> int:
        """Outcomes not taken yet."""
        return len(self._outcomes)

    def idle_fraction(self) -> float:
        """Share of the time since the first submit not spent evaluating (the driver's own work)."""
        if self._t0 is None:
            return 1.0
        total = time.monotonic() - self._t0
        return min(1.0, max(0.0, 1.0 - self._busy / total)) if total > 0 else 0.0

    def shutdown(self) -> None:
        """Close the evaluator (if it has ``close``); later submits raise."""
        if not self._closed:
            self._closed = True
            close = getattr(self.evaluator, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "InProcessExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

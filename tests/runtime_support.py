"""Helpers shared by the runtime tests (the fixtures that use them are in ``conftest.py``)."""

from __future__ import annotations

import time
from pathlib import Path

from evomerge.runtime import EvaluatorSpec, RayExecutor

TESTS_DIR = Path(__file__).resolve().parent
FAKES_ENV = {"env_vars": {"PYTHONPATH": str(TESTS_DIR)}}
"""How Ray workers import ``fake_evaluators`` (tests/ is not a package and not installed)."""
TIMEOUT = 2.0
"""The shared pool's per-job timeout (seconds)."""
STARTUP_LIMIT = 300.0
"""How long a test waits for (replacement) workers and for jobs queued behind them. A fresh actor
imports torch and evomerge, which on a loaded machine once took over 60 s; the pool itself gives a
worker 600 s to start. Waiting longer only costs time when the machine is slow: a slot that cannot
start is reported as ``dead`` and fails ``wait_all_idle`` at once."""


def fake_spec(name: str = "scripted") -> EvaluatorSpec:
    return EvaluatorSpec(objectives=[], factory=f"fake_evaluators:{name}")


def wait_all_idle(executor: RayExecutor, limit: float = STARTUP_LIMIT) -> None:
    """Replacement workers start in the background; wait for them before timing anything."""
    deadline = time.monotonic() + limit
    while True:
        workers = executor.workers()
        if all(w["state"] == "idle" for w in workers):
            return
        assert not any(w["state"] == "dead" for w in workers), workers
        assert time.monotonic() < deadline, workers
        time.sleep(0.05)


def drain(executor, limit: float = STARTUP_LIMIT) -> list:
    outcomes = []
    deadline = time.monotonic() + limit
    while executor.pending():
        outcome = executor.next_outcome(timeout=max(0.0, deadline - time.monotonic()))
        assert outcome is not None, "no outcome in time"
        outcomes.append(outcome)
    return outcomes

"""Fake evaluators for the runtime tests (no model, no tasks): used as ``EvaluatorSpec.factory``.

Each is chosen by a factory path ``"fake_evaluators:<name>"`` and scripted by the recipe: the first
model's name says what to do, ``"<action>"`` or ``"<action>:<argument>"``:

* ``sleep:<seconds>``  sleep, then succeed (``sleeper`` understands only this)
* ``die``              ``os._exit(1)``: the worker process vanishes (``killer``)
* ``die_once:<path>``  die unless ``<path>`` exists; create it first (writing our pid), so a retry succeeds
* ``hang``             never return (``hanger``)

A successful result reports ``{"seconds": <slept>, "pid": <worker pid>}`` as its objectives.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from evomerge.eval.result import CandidateResult


def recipe_for(action: str) -> dict:
    """A valid one-model linear recipe whose model name carries ``action``."""
    return {"merge_method": "linear", "models": [{"model": action, "parameters": {"weight": 1.0}}]}


class ScriptedEvaluator:
    def __init__(self, spec, actions: frozenset[str]):
        self.spec = spec
        self.actions = actions
        self.device = "cpu"

    def evaluate(self, recipe) -> CandidateResult:
        action, _, arg = recipe.models[0].model.partition(":")
        if action not in self.actions:
            raise ValueError(f"this fake does not do {action!r}")
        slept = 0.0
        started = time.time()
        if action == "sleep":
            slept = float(arg or 0)
            time.sleep(slept)
        elif action == "die":
            os._exit(1)
        elif action == "die_once":
            marker = Path(arg)
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
        elif action == "hang":
            while True:
                time.sleep(3600)
        objectives = {"seconds": slept, "pid": float(os.getpid()), "started": started, "ended": time.time()}
        return CandidateResult(recipe.content_hash(), "ok", objectives=objectives, seconds=slept)


def sleeper(spec) -> ScriptedEvaluator:
    return ScriptedEvaluator(spec, frozenset({"sleep"}))


def killer(spec) -> ScriptedEvaluator:
    return ScriptedEvaluator(spec, frozenset({"sleep", "die", "die_once"}))


def hanger(spec) -> ScriptedEvaluator:
    return ScriptedEvaluator(spec, frozenset({"sleep", "hang"}))


def scripted(spec) -> ScriptedEvaluator:
    """All of the above in one evaluator (one worker pool can serve several tests)."""
    return ScriptedEvaluator(spec, frozenset({"sleep", "die", "die_once", "hang"}))


def broken(spec):
    """A factory that fails: the worker cannot build its evaluator."""
    raise RuntimeError("no evaluator for you")


class QuadraticEvaluator:
    """A deterministic stand-in for scoring PS recipes: objective k is 1 - mean squared distance of
    the recipe's weights to target k, so optimizers have a real landscape to climb in milliseconds."""

    def __init__(self, spec):
        from evomerge.eval.tasks import Objective

        self.labels = [Objective.model_validate(o).label for o in spec.objectives]

    @staticmethod
    def _numbers(setting) -> list[float]:
        if isinstance(setting, (int, float)) and not isinstance(setting, bool):
            return [float(setting)]
        if isinstance(setting, list):
            return [v for item in setting for v in QuadraticEvaluator._numbers(item)]
        if hasattr(setting, "value"):
            return QuadraticEvaluator._numbers(setting.value)
        return []

    def evaluate(self, recipe) -> CandidateResult:
        import numpy as np

        if recipe.slices is not None:  # a routing: reward paths near 4 hops and layers from both models
            hops = len(recipe.slices)
            models = {s.sources[0].model for s in recipe.slices}
            values = [1.0 - abs(hops - 4) / 10, len(models) / 2 - hops / 100]
            objectives = dict(zip(self.labels, values))
            return CandidateResult(recipe.content_hash(), "ok", objectives=objectives, seconds=0.0)
        weights = np.array([v for m in recipe.models for v in self._numbers((m.parameters or {}).get("weight"))])
        objectives = {}
        for k, label in enumerate(self.labels):
            target = (k + 1) / (len(self.labels) + 1)
            objectives[label] = float(1.0 - np.mean((weights - target) ** 2))
        return CandidateResult(recipe.content_hash(), "ok", objectives=objectives, seconds=0.0)


def quadratic(spec) -> QuadraticEvaluator:
    return QuadraticEvaluator(spec)


class SlowQuadraticEvaluator(QuadraticEvaluator):
    """The quadratic landscape at a cost: each candidate sleeps a log-normal time (median
    ``EVOMERGE_FAKE_MEDIAN_S``, default 1 s; log-space sigma ``EVOMERGE_FAKE_SIGMA``, default 1), drawn
    from the recipe's hash so that a candidate costs the same wherever and whenever it runs. Stands in
    for real candidates, whose cost varies with generation lengths, cache hits and retries."""

    def __init__(self, spec):
        super().__init__(spec)
        self.median = float(os.environ.get("EVOMERGE_FAKE_MEDIAN_S", "1.0"))
        self.sigma = float(os.environ.get("EVOMERGE_FAKE_SIGMA", "1.0"))

    def evaluate(self, recipe) -> CandidateResult:
        import numpy as np

        digest = recipe.content_hash()
        rng = np.random.default_rng(int(digest[:12], 16))
        cost = float(self.median * np.exp(self.sigma * rng.standard_normal()))
        started = time.perf_counter()
        time.sleep(cost)
        result = super().evaluate(recipe)
        result.seconds = time.perf_counter() - started
        result.score_seconds = result.seconds
        return result


def slow_quadratic(spec) -> SlowQuadraticEvaluator:
    return SlowQuadraticEvaluator(spec)

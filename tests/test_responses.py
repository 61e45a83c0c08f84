"""Per-item responses: every scored candidate's value on every item of every objective is kept in the run
dir (responses.jsonl), they average to the recorded objective, both scoring backends give the same, and a
resumed run adds the new candidates' responses without scoring the old ones again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from search_support import search_zoo, zoo_pair_config

from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective
from evomerge.recipe import Recipe
from evomerge.search.rundir import RunDir


def recipe(zoo_dir: Path) -> Recipe:
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    models = [{"model": str(zoo_dir / meta["models"][s]), "parameters": {"weight": 0.8}} for s in ("latin", "greek")]
    return Recipe.from_dict(
        {"merge_method": "task_arithmetic", "base_model": str(zoo_dir / meta["base"]), "models": models}
    )


def test_item_values_average_to_the_objective_on_both_backends(zoo_dir) -> None:
    objectives = [
        Objective(task="zoo_latin", metric="acc", limit=10),
        Objective(task="zoo_greek", metric="acc", split="test", limit=7, subset_seed=3),
    ]
    results = {}
    for backend in ("fast", "lm-eval"):
        evaluator = CandidateEvaluator(objectives, include_paths=[str(zoo_dir / "tasks")], backend=backend)
        results[backend] = evaluator.evaluate(recipe(zoo_dir))
    fast = results["fast"]
    assert fast.ok and set(fast.items) == {"zoo_latin/acc", "zoo_greek/acc"}
    assert [len(v) for v in fast.items.values()] == [10, 7]
    for label, values in fast.items.items():
        assert set(values) <= {0.0, 1.0}
        assert np.mean(values) == pytest.approx(fast.objectives[label])
    assert results["lm-eval"].items == fast.items  # item for item, in the same order


def test_a_search_keeps_every_candidates_responses_and_a_resume_adds_only_new_ones(zoo_dir, tmp_path) -> None:
    config = zoo_pair_config(
        zoo_dir,
        [{"task": "zoo_latin", "metric": "acc", "limit": 8}, {"task": "zoo_greek", "metric": "acc", "limit": 8}],
    )

    def search(budget: int, resume: bool) -> None:
        search_zoo(config, tmp_path / "run", budget=budget, resume=resume)

    search(4, resume=False)
    run_dir = RunDir(tmp_path / "run")
    first = run_dir.responses()
    search(8, resume=True)
    records = {r.id: r for r in run_dir.records()}
    responses = run_dir.responses()
    assert len(records) == 8
    lines = (tmp_path / "run" / "responses.jsonl").read_text().splitlines()
    scored = [r for r in records.values() if r.ok and not r.cached]
    assert len(lines) == len(scored)  # one line per candidate actually scored, none scored twice
    assert {k: v for k, v in responses.items() if k in first} == first  # the old ones untouched
    by_hash = run_dir.responses_by_hash()
    for record in records.values():
        items = responses.get(record.id) or by_hash[record.recipe_hash]  # a cached candidate: by its recipe
        for label, value in record.objectives.items():
            assert len(items[label]) == 8 and np.mean(items[label]) == pytest.approx(value)

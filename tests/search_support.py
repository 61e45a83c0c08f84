"""A small quadratic search on the random family, scored by a fake evaluator: shared by the driver,
record and export tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.runtime import make_executor
from evomerge.search.config import resolve_run_config
from evomerge.search.driver import Search
from evomerge.search.rundir import RunDir


def run_config(family, tmp_path, **overrides) -> dict:
    config = {
        "name": "quad",
        "search_space": {
            "models": [str(family["a"]), str(family["b"])],
            "base_model": str(family["base"]),
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0, "high": 1}},
            "granularity": 2,
        },
        "objectives": [
            {"task": "t1", "metric": "acc", "name": "first", "direction": "maximize"},
            {"task": "t2", "metric": "acc", "name": "second", "direction": "maximize"},
        ],
        "optimizer": {"name": "nsga2", "population": 6, "budget": 24, "seed": 3},
        "runtime": {"workers": 0},
    }
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def zoo_pair_config(zoo_dir: Path, objectives: list[dict], **optimizer) -> dict:
    """A run over the zoo's latin and greek specialists (task arithmetic, one weight each in 0-2),
    in-process, CMA-ES with a population of 4 unless ``optimizer`` says otherwise."""
    return {
        "name": "zoo-pair",
        "zoo": str(zoo_dir),
        "search_space": {
            "kind": "ps",
            "models": ["latin", "greek"],
            "base_model": "base",
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 2.0}},
        },
        "objectives": objectives,
        "optimizer": {"name": "cma", "population": 4, "budget": 4, "seed": 0, **optimizer},
        "runtime": {"workers": 0},
    }


def search_zoo(
    config: dict, run_dir: Path, *, budget: int, resume: bool = False, workers: int = 0, **runtime: Any
) -> None:
    """Run ``config`` (``zoo_pair_config``) to ``budget`` candidates in ``run_dir`` (Ray with ``workers``;
    more ``runtime`` settings as keywords)."""
    data = {
        **config,
        "optimizer": {**config["optimizer"], "budget": budget},
        "runtime": {"workers": workers, **runtime},
    }
    run = resolve_run_config(data, base_dir=run_dir.parent)
    executor = make_executor(run)
    try:
        Search(run, RunDir(run_dir), executor).execute(resume=resume)
    finally:
        executor.shutdown()


def search(
    family, tmp_path, run_dir: Path, resume: bool = False, budget: int | None = None, on_record=None, **overrides
):
    run = resolve_run_config(run_config(family, tmp_path, **overrides), base_dir=tmp_path)
    executor = make_executor(run, evaluator_factory="fake_evaluators:quadratic")
    try:
        return Search(run, RunDir(run_dir), executor, budget=budget, on_record=on_record).execute(resume=resume)
    finally:
        executor.shutdown()

"""Search: genome decoding edge cases, optimizer determinism, the checkpointed driver and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.runtime import make_executor
from evomerge.search.config import ConfigError, parse_duration, resolve_run_config
from evomerge.search.driver import Search, SearchError
from evomerge.search.optimizers import make_optimizer
from evomerge.search.record import CandidateRecord, CandidateStatus
from evomerge.search.report import RunReport
from evomerge.search.rundir import RunDir

TESTS = Path(__file__).parent


# --- optimizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cma", "nsga2", "random"])
def test_same_seed_and_scores_give_the_same_candidates(name) -> None:
    def run(seed: int) -> list[np.ndarray]:
        opt = make_optimizer(name, 5, 2, population=6, seed=seed, sigma=0.3)
        asked = []
        for _ in range(4):
            X = opt.ask()
            F = np.stack([((X - 0.2) ** 2).sum(1), ((X - 0.8) ** 2).sum(1)], axis=1)
            F[1] = np.nan  # a failed candidate
            opt.tell(X, F)
            asked.append(X)
        return asked

    first, again, other = run(0), run(0), run(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert all(((X >= 0) & (X <= 1)).all() for X in first)


def test_cma_improves_on_a_simple_landscape() -> None:
    opt = make_optimizer("cma", 4, 1, population=8, seed=0, sigma=0.3)
    best = []
    for _ in range(12):
        X = opt.ask()
        F = ((X - 0.25) ** 2).sum(1, keepdims=True)
        opt.tell(X, F)
        best.append(F.min())
    assert best[-1] < best[0] / 10


def test_cma_scalarizations() -> None:
    """weighted_sum adds the objectives; worst keeps the worst one, so a balanced candidate beats a
    lopsided one with the same sum; bad names are refused with the valid ones."""
    F = np.array([[-1.0, 0.0], [-0.5, -0.5], [np.nan, -2.0]])
    summed = make_optimizer("cma", 3, 2, population=4, seed=0).scalar(F)
    worst = make_optimizer("cma", 3, 2, population=4, seed=0, scalarize="worst").scalar(F)
    assert summed[:2].tolist() == [-1.0, -1.0]
    assert worst[:2].tolist() == [0.0, -0.5]
    assert worst[2] > worst[:2].max()  # a failed candidate (NaN) is penalized below every finite one
    with pytest.raises(ValueError, match="scalarize.*weighted_sum, worst"):
        make_optimizer("cma", 3, 2, population=4, seed=0, scalarize="median")


# --- driver --------------------------------------------------------------------------------------


def run_config(family, tmp_path, **overrides) -> dict:
    config = {
        "name": "quad",
        "search_space": {"models": [str(family["a"]), str(family["b"])], "base_model": str(family["base"]),
                         "method": "task_arithmetic", "parameters": {"weight": {"low": 0, "high": 1}}, "granularity": 2},
        "objectives": [{"task": "t1", "metric": "acc", "name": "first", "direction": "maximize"},
                       {"task": "t2", "metric": "acc", "name": "second", "direction": "maximize"}],
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


def search(family, tmp_path, run_dir: Path, resume: bool = False, budget: int | None = None, **overrides):
    run = resolve_run_config(run_config(family, tmp_path, **overrides), base_dir=tmp_path)
    executor = make_executor(run, evaluator_factory="fake_evaluators:quadratic")
    try:
        return Search(run, RunDir(run_dir), executor, budget=budget).execute(resume=resume)
    finally:
        executor.shutdown()


@pytest.mark.parametrize("optimizer", ["nsga2", "cma", "random"])
def test_search_records_everything_and_resumes_exactly(random_family, tmp_path, optimizer) -> None:
    whole = search(random_family, tmp_path, tmp_path / "whole", **{"optimizer.name": optimizer})
    assert whole.evaluated == 24 and whole.stopped == "budget"
    records = list(RunDir(tmp_path / "whole").records())
    assert [r.id for r in records] == list(range(24))
    line = json.loads((tmp_path / "whole" / "evaluations.jsonl").read_text().splitlines()[0])
    assert {"id", "generation", "genome", "recipe_hash", "objectives", "status", "worker", "seconds"} <= line.keys()
    assert CandidateRecord.from_json(line) == records[0] and records[0].status is CandidateStatus.OK

    # the same run in three pieces (budget 7, then 15, then the rest) ends in the same place
    part = tmp_path / "parts"
    search(random_family, tmp_path, part, budget=7, **{"optimizer.name": optimizer})
    search(random_family, tmp_path, part, resume=True, budget=15, **{"optimizer.name": optimizer})
    resumed = search(random_family, tmp_path, part, resume=True, **{"optimizer.name": optimizer})
    assert resumed.evaluated == 24
    pieces = list(RunDir(part).records())
    assert [r.genome for r in pieces] == [r.genome for r in records]
    assert [r.id for r in resumed.front] == [r.id for r in whole.front]


def test_identical_candidates_are_scored_once(random_family, tmp_path) -> None:
    # a space with one coarse gene: many candidates decode to the same recipe
    summary = search(random_family, tmp_path, tmp_path / "dup", **{
        "search_space.parameters": {"weight": {"low": 0.5, "high": 0.5}}, "optimizer.name": "random",
        "search_space.granularity": "model", "optimizer.budget": 12,
    })
    records = list(RunDir(tmp_path / "dup").records())
    assert summary.evaluated == 12 and summary.cached == 11
    assert len({r.recipe_hash for r in records}) == 1


def test_run_dir_guards(random_family, tmp_path) -> None:
    search(random_family, tmp_path, tmp_path / "run", budget=6)
    with pytest.raises(SearchError, match="already holds a run"):
        search(random_family, tmp_path, tmp_path / "run")
    with pytest.raises(SearchError, match="nothing to resume"):
        search(random_family, tmp_path, tmp_path / "empty", resume=True)
    with pytest.raises(SearchError, match="the objectives differs|objectives"):
        search(random_family, tmp_path, tmp_path / "run", resume=True, **{"objectives": [{"task": "t9", "metric": "acc", "direction": "maximize"}]})


def test_budget_zero_is_refused_not_replaced_by_the_config_budget(random_family, tmp_path) -> None:
    with pytest.raises(SearchError, match="budget: 0 candidates"):
        search(random_family, tmp_path, tmp_path / "zero", budget=0)
    assert not (tmp_path / "zero").exists()


def test_torn_last_line_is_repaired_on_resume(random_family, tmp_path) -> None:
    run_dir = tmp_path / "torn"
    search(random_family, tmp_path, run_dir, budget=6)
    with open(run_dir / "evaluations.jsonl", "a") as f:
        f.write('{"id": 99, "half a rec')
    summary = search(random_family, tmp_path, run_dir, resume=True, budget=12)
    assert summary.evaluated == 12
    assert [r.id for r in RunDir(run_dir).records()] == list(range(12))


def test_config_errors_name_the_field(random_family, tmp_path) -> None:
    bad = run_config(random_family, tmp_path)
    bad["optimizer"]["population"] = 1
    with pytest.raises(ConfigError, match="optimizer.population"):
        resolve_run_config(bad, base_dir=tmp_path)
    bad = run_config(random_family, tmp_path)
    bad["objectives"][0].pop("metric")
    with pytest.raises(ConfigError, match=r"objectives\[0\].metric: required"):
        resolve_run_config(bad, base_dir=tmp_path)
    bad = run_config(random_family, tmp_path)
    bad["search_space"]["models"] = ["nonexistent-name"]
    with pytest.raises(ConfigError, match="neither a zoo name nor an existing directory"):
        resolve_run_config(bad, base_dir=tmp_path)
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    with pytest.raises(ConfigError, match="expected a duration"):
        parse_duration("soon")


# --- the real thing: a search process on the zoo, killed with SIGKILL and resumed ------------------


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_front(zoo_dir, tmp_path) -> None:
    env = {**os.environ, "EVOMERGE_ZOO_DIR": str(zoo_dir), "PYTHONPATH": str(TESTS.parent)}
    config = TESTS.parent / "configs" / "zoo-ps-nsga2.yaml"
    common = ["--set", "optimizer.budget=24", "--set", "optimizer.population=6", "--workers", "0", "-q"]
    small = [*common, "--set", "objectives=[{task: zoo_reverse, metric: acc, limit: 20}, {task: zoo_sort, metric: acc, limit: 20}]"]

    whole = cli("search", str(config), "--run-dir", str(tmp_path / "whole"), *small, env=env)
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed_dir = tmp_path / "killed"
    victim = cli("search", str(config), "--run-dir", str(killed_dir), *small, env=env)
    evaluations = killed_dir / "evaluations.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if evaluations.exists() and len(evaluations.read_text().splitlines()) >= 9:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = len(list(RunDir(killed_dir).records()))
    assert 9 <= done_before < 24

    resumed = cli("search", str(config), "--run-dir", str(killed_dir), "--resume", *small, env=env)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    before, after = list(RunDir(tmp_path / "whole").records()), list(RunDir(killed_dir).records())
    assert [r.id for r in after] == list(range(24)), "a candidate was lost or scored twice"
    assert [r.genome for r in after] == [r.genome for r in before]
    assert [r.objectives for r in after] == [r.objectives for r in before]
    assert [r.id for r in RunReport.load(killed_dir).front()] == [r.id for r in RunReport.load(tmp_path / "whole").front()]

    shown = subprocess.run([sys.executable, "-m", "evomerge.cli", "front", str(killed_dir), "--json"],
                           env=env, capture_output=True, text=True, check=True)
    payload = json.loads(shown.stdout)
    assert [r["id"] for r in payload["front"]] == [r.id for r in RunReport.load(killed_dir).front()]


@pytest.mark.slow
def test_sigterm_stops_a_search_cleanly(zoo_dir, tmp_path) -> None:
    """`kill PID` (SIGTERM) ends a search like Ctrl-C: what was scored is kept, the command says how
    to resume, and the resumed run finishes the budget without scoring anything twice."""
    env = {**os.environ, "EVOMERGE_ZOO_DIR": str(zoo_dir)}
    config = TESTS.parent / "configs" / "zoo-ps-nsga2.yaml"
    args = ["--set", "optimizer.budget=18", "--set", "optimizer.population=6", "--workers", "0", "-q",
            "--set", "objectives=[{task: zoo_reverse, metric: acc, limit: 10}]"]
    run_dir = tmp_path / "run"
    victim = cli("search", str(config), "--run-dir", str(run_dir), *args, env=env)
    evaluations = run_dir / "evaluations.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (evaluations.exists() and len(evaluations.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    output = victim.communicate(timeout=120)[0]
    assert victim.returncode == 0, output
    assert "interrupted" in output and "--resume" in output
    done = len(list(RunDir(run_dir).records()))
    assert 3 <= done < 18
    resumed = cli("search", str(config), "--run-dir", str(run_dir), "--resume", *args, env=env)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    assert [r.id for r in RunDir(run_dir).records()] == list(range(18))

"""search/driver: every candidate recorded, exact resume, the dedup cache and the run-dir guards."""

from __future__ import annotations

import json

import pytest
from search_support import search

from evomerge.search.driver import SearchError
from evomerge.search.record import CandidateRecord, CandidateStatus
from evomerge.search.rundir import RunDir


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
    summary = search(
        random_family,
        tmp_path,
        tmp_path / "dup",
        **{
            "search_space.parameters": {"weight": {"low": 0.5, "high": 0.5}},
            "optimizer.name": "random",
            "search_space.granularity": "model",
            "optimizer.budget": 12,
        },
    )
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
        search(
            random_family,
            tmp_path,
            tmp_path / "run",
            resume=True,
            **{"objectives": [{"task": "t9", "metric": "acc", "direction": "maximize"}]},
        )


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


# --- async mode: no barrier, exact resume by replaying the recorded tell order ---------------------


class Crash(Exception):
    """A stop between writing a record and checkpointing the optimizer told about it."""


@pytest.mark.parametrize("optimizer", ["nsga2", "cma"])
def test_async_mode_resumes_exactly_and_replays_untold_records(random_family, tmp_path, optimizer) -> None:
    mode = {"optimizer.name": optimizer, "optimizer.mode": "async"}
    whole = search(random_family, tmp_path, tmp_path / "whole", **mode)
    assert whole.evaluated == 24
    records = list(RunDir(tmp_path / "whole").records())
    assert [r.id for r in records] == list(range(24))
    again = search(random_family, tmp_path, tmp_path / "again", **mode)  # in-process: one arrival order
    assert [r.genome for r in RunDir(tmp_path / "again").records()] == [r.genome for r in records]
    assert [r.id for r in again.front] == [r.id for r in whole.front]

    # stopped by budget twice, then a crash right after record 17 was written but before it was told
    part = tmp_path / "parts"
    search(random_family, tmp_path, part, budget=7, **mode)
    search(random_family, tmp_path, part, resume=True, budget=15, **mode)

    def crash(record) -> None:
        if record.id == 17:
            raise Crash

    with pytest.raises(Crash):
        search(random_family, tmp_path, part, resume=True, on_record=crash, **mode)
    state = RunDir(part).load_state()
    assert 17 not in state.told and 17 in state.asked  # written, not told: the resume must replay it
    resumed = search(random_family, tmp_path, part, resume=True, **mode)
    assert resumed.evaluated == 24
    pieces = list(RunDir(part).records())
    assert [r.genome for r in pieces] == [r.genome for r in records]
    assert RunDir(part).load_state().told == list(range(24))
    assert [r.id for r in resumed.front] == [r.id for r in whole.front]


def test_async_and_barrier_runs_do_not_resume_each_other(random_family, tmp_path) -> None:
    search(random_family, tmp_path, tmp_path / "run", budget=6)
    with pytest.raises(SearchError, match="mode differs"):
        search(random_family, tmp_path, tmp_path / "run", resume=True, **{"optimizer.mode": "async"})


# --- the run dir's disk fails: a clean stop, nothing torn, --resume once it takes writes again ------


@pytest.mark.parametrize("where", ["torn record", "fsync"])
def test_a_full_disk_stops_the_search_cleanly_and_resume_continues_exactly(
    random_family, tmp_path, monkeypatch, where
) -> None:
    import errno

    import evomerge.atomic

    search(random_family, tmp_path, tmp_path / "whole")
    run_dir = tmp_path / "full"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "torn record":  # the 10th record gets half written, then the disk is full
        real_append, count = RunDir.append, [0]

        def append(self, record) -> None:
            count[0] += 1
            if count[0] == 10:
                with open(self.evaluations_path, "a") as f:
                    f.write('{"id": 9, "generat')
                raise full
            real_append(self, record)

        monkeypatch.setattr(RunDir, "append", append)
    else:  # the 12th fsync (of a record, the state's temp file or the directory) fails: os.fsync for all
        real_fsync, count = evomerge.atomic.os.fsync, [0]

        def fsync(fd) -> None:
            count[0] += 1
            if count[0] == 12:
                raise full
            real_fsync(fd)

        monkeypatch.setattr(evomerge.atomic.os, "fsync", fsync)
    with pytest.raises(SearchError, match=r"cannot write \(No space left on device\).*--resume"):
        search(random_family, tmp_path, run_dir)
    monkeypatch.undo()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    resumed = search(random_family, tmp_path, run_dir, resume=True)
    assert resumed.evaluated == 24
    assert [r.genome for r in RunDir(run_dir).records()] == [r.genome for r in RunDir(tmp_path / "whole").records()]


def test_a_garbage_line_is_refused_with_its_number_and_nothing_is_touched(random_family, tmp_path) -> None:
    run_dir = tmp_path / "run"
    search(random_family, tmp_path, run_dir, budget=6)
    lines = (run_dir / "evaluations.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "evaluations.jsonl").write_text(lines[0] + "not json at all\n" + "".join(lines[1:]))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"evaluations.jsonl:2: not a candidate record"):
        search(random_family, tmp_path, run_dir, resume=True, budget=12)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_truncated_source_checkpoint_is_named_before_anything_is_scored(random_family, tmp_path) -> None:
    import shutil

    broken = tmp_path / "broken-a"
    shutil.copytree(random_family["a"], broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SearchError, match=rf"{weights}: truncated"):
        search(
            random_family, tmp_path, tmp_path / "run", **{"search_space.models": [str(broken), str(random_family["b"])]}
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_worker_killed_mid_candidate_is_replaced_and_the_search_finishes(random_family, tmp_path, local_ray) -> None:
    """SIGKILL to a Ray worker while it scores: its candidate is retried on another worker, the slot
    gets a new process, and the search ends with every candidate scored."""
    import os
    import signal

    from runtime_support import TESTS_DIR, wait_all_idle
    from search_support import run_config

    from evomerge.runtime import EvaluatorSpec, RayExecutor
    from evomerge.search.config import resolve_run_config
    from evomerge.search.driver import Search

    run = resolve_run_config(run_config(random_family, tmp_path, **{"optimizer.budget": 12}), base_dir=tmp_path)
    spec = EvaluatorSpec(objectives=[o.model_dump() for o in run.objectives], factory="fake_evaluators:slow_quadratic")
    env = {"env_vars": {"PYTHONPATH": str(TESTS_DIR), "EVOMERGE_FAKE_MEDIAN_S": "0.5", "EVOMERGE_FAKE_SIGMA": "0"}}
    executor = RayExecutor(spec, workers=2, timeout=120, runtime_env=env)
    killed: list[int] = []

    def kill_a_busy_worker(record) -> None:
        if record.id >= 2 and not killed:  # the first record after which a worker is mid-candidate
            busy = [w["pid"] for w in executor.workers() if w["state"] == "busy" and w["pid"]]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])

    try:
        wait_all_idle(executor)
        pids_before = {w["pid"] for w in executor.workers()}
        summary = Search(run, RunDir(tmp_path / "run"), executor, on_record=kill_a_busy_worker).execute()
        wait_all_idle(executor)
        pids_after = {w["pid"] for w in executor.workers()}
    finally:
        executor.shutdown()
    records = list(RunDir(tmp_path / "run").records())
    assert summary.evaluated == 12 and summary.failed == 0 and killed
    assert any(r.attempts == 2 for r in records)  # the killed candidate, scored on its second attempt
    assert killed[0] not in pids_after and len(pids_after) == 2 and pids_after != pids_before

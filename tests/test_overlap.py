"""Overlap (``runtime.overlap``): a worker merges one candidate into a second resident model while it
scores another. The evaluator gives the same results as one candidate at a time and really does merge
during a scoring; without room for a second model it falls back to one at a time; a Ray worker with
two lanes runs two jobs side by side; both jobs on a worker that died are run again (each spends its
retry: the death cannot be pinned on one), and a job beside one that timed out runs again as it was."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import pytest
from fake_evaluators import recipe_for
from runtime_support import FAKES_ENV, drain, fake_spec, wait_all_idle
from search_support import search_zoo
from test_multifidelity import config as screened_config
from test_resident import recipes

import evomerge.eval.evaluator as evaluator_module
from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective
from evomerge.runtime import Job, RayExecutor
from evomerge.runtime.factory import overlap_lanes
from evomerge.search.rundir import RunDir


def make(zoo_dir: Path, buffers: int) -> CandidateEvaluator:
    objectives = [Objective(task=f"zoo_{s}", metric="acc", limit=20) for s in ("latin", "greek")]
    return CandidateEvaluator(objectives, include_paths=[zoo_dir / "tasks"], device="cpu", buffers=buffers)


def in_threads(evaluator: CandidateEvaluator, todo: list) -> list:
    results: list = [None] * len(todo)

    def one(i: int) -> None:
        results[i] = evaluator.evaluate(todo[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(todo))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "an evaluate call never returned"
    return results


def test_two_buffers_merge_one_candidate_while_scoring_another(zoo_dir, monkeypatch) -> None:
    todo = recipes(zoo_dir)
    sequential = [make(zoo_dir, 1).evaluate(r) for r in todo]
    assert all(r.ok for r in sequential), [r.reason for r in sequential]

    evaluator = make(zoo_dir, 2)
    merges = 0
    second_merged = threading.Event()
    plain_merge, plain_score = evaluator_module.materialize_into, evaluator._score

    def counting_merge(*args, **kwargs):
        nonlocal merges
        plain_merge(*args, **kwargs)
        merges += 1
        if merges == 2:
            second_merged.set()

    overlapped = []

    def waiting_score(*args, **kwargs):
        if not second_merged.is_set():  # the first scoring: the other candidate must merge meanwhile
            overlapped.append(second_merged.wait(timeout=60))
        return plain_score(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "materialize_into", counting_merge)
    monkeypatch.setattr(evaluator, "_score", waiting_score)
    results = in_threads(evaluator, todo[:2])
    assert overlapped == [True], "the second candidate was not merged while the first was scored"
    ((first, second),) = evaluator._models.values()  # two resident models, one per candidate in flight
    assert first is not second
    monkeypatch.setattr(evaluator, "_score", plain_score)
    results += in_threads(evaluator, todo[2:])  # the buffers are reused, nothing stale carries over
    for got, want in zip(results, sequential):
        assert got.ok, got.reason
        assert got.objectives == want.objectives and got.items == want.items


def test_without_room_for_a_second_model_candidates_take_turns(zoo_dir, monkeypatch, caplog) -> None:
    todo = recipes(zoo_dir)
    sequential = [make(zoo_dir, 1).evaluate(r) for r in todo]
    evaluator = make(zoo_dir, 2)
    import evomerge.merge.resident as resident

    monkeypatch.setattr(resident, "free_bytes", lambda device: 1)
    results = in_threads(evaluator, todo)
    assert [len(models) for models in evaluator._models.values()] == [1]
    assert "does not fit" in (evaluator.buffer_note or "") and "one at a time" in caplog.text
    assert [r.objectives for r in results] == [r.objectives for r in sequential]


def test_bad_buffer_and_overlap_settings_are_refused(zoo_dir) -> None:
    with pytest.raises(ValueError, match="buffers: 3"):
        make(zoo_dir, 3)
    with pytest.raises(ValueError, match="runtime.overlap: 'sometimes'"):
        overlap_lanes("sometimes", 0)
    assert [overlap_lanes(o, g) for o, g in [("auto", 0), ("auto", 1), ("on", 0), ("off", 1)]] == [1, 2, 2, 1]


@pytest.fixture
def laned_pool(local_ray):
    """One Ray worker taking two jobs at once (on one of the session Ray's spare CPUs)."""
    executor = RayExecutor(fake_spec(), workers=1, timeout=4, runtime_env=FAKES_ENV, lanes=2)
    yield executor
    executor.shutdown()


def test_a_worker_with_two_lanes_runs_two_jobs_side_by_side(laned_pool, tmp_path) -> None:
    wait_all_idle(laned_pool)
    assert laned_pool.capacity == 2
    laned_pool.submit(Job(1, recipe_for("sleep:1")))
    laned_pool.submit(Job(2, recipe_for("sleep:1.0")))
    laned_pool.submit(Job(3, recipe_for("sleep:0.5")))  # queued: both lanes are taken
    outcomes = drain(laned_pool)
    assert sorted(o.job.candidate_id for o in outcomes) == [1, 2, 3] and all(o.result.ok for o in outcomes)
    by_id = {o.job.candidate_id: o.result.objectives for o in outcomes}
    assert by_id[1]["pid"] == by_id[2]["pid"]  # one worker process
    assert max(by_id[1]["started"], by_id[2]["started"]) < min(by_id[1]["ended"], by_id[2]["ended"])
    assert by_id[3]["started"] >= min(by_id[1]["ended"], by_id[2]["ended"]) - 0.05  # it waited for a free lane

    # the worker dies of one job: which one is not known, so both are run again on a fresh worker
    marker = tmp_path / "died"
    laned_pool.submit(Job(4, recipe_for("sleep:2")))
    laned_pool.submit(Job(5, recipe_for(f"die_once:{marker}")))
    outcomes = {o.job.candidate_id: o for o in drain(laned_pool)}
    assert outcomes[4].result.ok and outcomes[4].job.attempt == 1, outcomes[4].result.reason
    assert outcomes[5].result.ok and outcomes[5].job.attempt == 1, outcomes[5].result.reason
    assert outcomes[4].result.objectives["pid"] != int(marker.read_text())  # not the process that died
    assert laned_pool.capacity == 2

    # a job times out: the worker is replaced; the job beside it runs again with its retry unspent
    wait_all_idle(laned_pool)
    laned_pool.submit(Job(6, recipe_for("hang")))
    time.sleep(2)
    laned_pool.submit(Job(7, recipe_for("sleep:2.5")))  # still running when job 6 times out
    outcomes = {o.job.candidate_id: o for o in drain(laned_pool)}
    assert outcomes[6].result.status == "failed" and "timeout" in outcomes[6].result.reason
    assert outcomes[7].result.ok and outcomes[7].job.attempt == 0, outcomes[7].result.reason


@pytest.mark.slow
def test_a_search_on_an_overlapping_ray_worker_matches_the_in_process_one(zoo_dir, tmp_path, local_ray) -> None:
    """The whole path: ``runtime.overlap: on`` gives the worker two lanes and its evaluator two resident
    models; a (screened, barrier) search then records what the in-process run records."""
    search_zoo(screened_config(zoo_dir), tmp_path / "inprocess", budget=8)
    search_zoo(screened_config(zoo_dir), tmp_path / "ray", budget=8, workers=1, overlap="on")

    def rows(run: Path) -> list[tuple]:
        return [(r.id, r.recipe_hash, r.fidelity, r.promoted_from, dict(r.objectives)) for r in RunDir(run).records()]

    assert sorted(rows(tmp_path / "ray")) == sorted(rows(tmp_path / "inprocess"))
    workers = {r.worker for r in RunDir(tmp_path / "ray").records() if not r.cached}
    assert len(workers) == 1 and next(iter(workers)).startswith("ray-actor-")


def test_two_lanes_spread_jobs_over_workers_before_doubling_up() -> None:
    """Every worker gets a job before any gets a second; a job queued behind another on its worker gets
    the timeout once more (it may wait for the other at the evaluator's locks)."""
    from evomerge.runtime.ray_pool import _Slot

    class Actor:
        class evaluate:  # noqa: N801 - mimics a Ray actor method handle
            @staticmethod
            def remote(job):
                return object()

    executor = RayExecutor.__new__(RayExecutor)  # the dispatch logic alone: no Ray
    executor.lanes, executor.timeout, executor._refs = 2, 10.0, {}
    executor._slots = [_Slot(i, name=f"w{i}", actor=Actor(), state="idle") for i in range(3)]
    executor._queue = collections.deque((Job(i, recipe_for("sleep:0")), 0, []) for i in range(4))
    executor._dispatch()
    assert [len(s.runs) for s in executor._slots] == [2, 1, 1]
    first, second = executor._slots[0].runs.values()
    assert second.deadline - second.started == pytest.approx(20.0) and first.deadline - first.started == 10.0
    executor._queue.extend((Job(i, recipe_for("sleep:0")), 0, []) for i in range(4, 8))
    executor._dispatch()
    assert [len(s.runs) for s in executor._slots] == [2, 2, 2] and len(executor._queue) == 2

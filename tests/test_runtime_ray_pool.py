"""evomerge.runtime.ray_pool: parallel dispatch, timeouts and worker deaths (retried once, replaced).

One local Ray (5 logical CPUs) and one pool of 2 workers (``conftest.py``) serve these tests. The
evaluators are fakes from ``fake_evaluators.py`` (sleep / die / hang, scripted by the recipe), so
nothing here needs a model.
"""

from __future__ import annotations

import time

import pytest
from fake_evaluators import recipe_for
from runtime_support import FAKES_ENV, STARTUP_LIMIT, TIMEOUT, drain, fake_spec, wait_all_idle

from evomerge.runtime import InProcessExecutor, Job, RayExecutor


def test_jobs_run_in_parallel_on_two_workers(pool):
    wait_all_idle(pool)
    assert pool.capacity == 2
    pool.submit(Job(1, recipe_for("sleep:1")))
    pool.submit(Job(2, recipe_for("sleep:1.0")))
    assert pool.next_outcome(timeout=0) is None  # submit returned before any job finished
    outcomes = drain(pool)
    starts = [o.result.objectives["started"] for o in outcomes]
    ends = [o.result.objectives["ended"] for o in outcomes]
    assert max(starts) < min(ends), "the two jobs did not run at the same time"
    assert sorted(o.job.candidate_id for o in outcomes) == [1, 2]
    assert all(o.result.ok and o.result.objectives["seconds"] == 1.0 for o in outcomes)
    assert len({o.worker for o in outcomes}) == 2 and len({o.result.objectives["pid"] for o in outcomes}) == 2
    assert 0.0 <= pool.idle_fraction() < 0.5


def test_worker_death_is_retried_on_another_worker(pool, tmp_path):
    wait_all_idle(pool)
    marker = tmp_path / "died"
    pool.submit(Job(7, recipe_for(f"die_once:{marker}")))
    (outcome,) = drain(pool)
    assert outcome.result.ok, outcome.result.reason
    assert outcome.job.candidate_id == 7 and outcome.job.attempt == 1
    assert outcome.result.objectives["pid"] != int(marker.read_text())  # not the process that died
    assert pool.capacity == 2


def test_worker_that_keeps_dying_fails_and_capacity_is_kept(pool):
    wait_all_idle(pool)
    before = {w["name"] for w in pool.workers()}
    pool.submit(Job(8, recipe_for("die")))
    (outcome,) = drain(pool)
    assert outcome.result.status == "failed" and outcome.job.attempt == 1
    assert outcome.result.reason.startswith("worker died"), outcome.result.reason
    assert "2 attempts" in outcome.result.reason and "process exited" in outcome.result.reason
    assert outcome.result.recipe_hash and outcome.worker in before | {w["name"] for w in pool.workers()}
    # both dead actors were replaced by fresh ones: two jobs still run side by side
    assert pool.capacity == 2
    wait_all_idle(pool)
    after = {w["name"] for w in pool.workers()}
    assert after.isdisjoint(before), (before, after)
    pool.submit(Job(9, recipe_for("sleep:0.5")))
    pool.submit(Job(10, recipe_for("sleep:0.5")))
    outcomes = drain(pool)
    # records name a Ray worker as actor@node
    assert all(o.result.ok for o in outcomes) and {o.worker.split("@")[0] for o in outcomes} == after
    assert all(o.worker.split("@")[1] for o in outcomes)
    starts = [o.result.objectives["started"] for o in outcomes]
    assert max(starts) < min(o.result.objectives["ended"] for o in outcomes)  # side by side


def test_timeout_is_retried_once_then_fails(pool):
    wait_all_idle(pool)
    start = time.monotonic()
    pool.submit(Job(11, recipe_for("hang")))
    pool.submit(Job(12, recipe_for("sleep:0")))
    outcomes = {o.job.candidate_id: o for o in drain(pool)}
    hung = outcomes[11]
    assert hung.result.status == "failed" and hung.job.attempt == 1
    assert hung.result.reason.startswith("timeout"), hung.result.reason
    assert "2 attempts" in hung.result.reason
    assert time.monotonic() - start >= 2 * TIMEOUT
    assert outcomes[12].result.ok  # the other worker kept working meanwhile
    # the killed attempts never report later, and the pool is whole again
    assert pool.next_outcome(timeout=0.3) is None and pool.pending() == 0
    assert pool.capacity == 2
    pool.submit(Job(13, recipe_for("sleep:0")))
    (after,) = drain(pool)
    assert after.result.ok and after.job.candidate_id == 13


def test_inprocess_and_ray_give_the_same_results(pool):
    jobs = [
        Job(20, recipe_for("sleep:0")),
        Job(21, recipe_for("sleep:0.1")),
        Job(22, {"merge_method": "no-such-method", "models": [{"model": "x"}]}),  # invalid recipe
        Job(23, recipe_for("explode")),  # the evaluator raises
    ]
    inprocess = InProcessExecutor(fake_spec())
    for job in jobs:
        inprocess.submit(job)
        pool.submit(job)
    local = {o.job.candidate_id: o.result for o in drain(inprocess)}
    remote = {o.job.candidate_id: o.result for o in drain(pool)}
    assert local.keys() == remote.keys() == {20, 21, 22, 23}
    for cid in local:
        a, b = local[cid], remote[cid]
        assert (a.status, a.recipe_hash, a.reason) == (b.status, b.recipe_hash, b.reason), cid
        varying = {"pid", "started", "ended"}  # which process, and when: the rest must agree
        assert {k: v for k, v in a.objectives.items() if k not in varying} == {
            k: v for k, v in b.objectives.items() if k not in varying
        }
    assert local[20].ok and local[21].ok
    assert "no-such-method" in local[22].reason
    assert "ValueError" in local[23].reason and "explode" in local[23].reason


def test_a_worker_that_cannot_build_its_evaluator_fails_fast(local_ray):
    with pytest.raises(RuntimeError, match="no evaluator for you"):
        RayExecutor(fake_spec("broken"), workers=1, runtime_env=FAKES_ENV, startup_timeout=STARTUP_LIMIT)


def test_the_pool_has_no_thread_of_its_own(pool):
    import threading

    wait_all_idle(pool)
    before = set(threading.enumerate())
    pool.submit(Job(30, recipe_for("sleep:0")))
    (outcome,) = drain(pool)
    assert outcome.result.ok
    assert set(threading.enumerate()) <= before  # it advanced inside submit/next_outcome, in this thread
    assert not any(t.name == "evomerge-ray-dispatch" for t in threading.enumerate())


def test_one_off_work_runs_on_an_idle_worker_and_hands_it_back(pool):
    import os

    wait_all_idle(pool)
    pid, worker = pool.call_on_worker("os:getpid", {})
    assert pid != os.getpid() and worker.startswith("ray-actor-")
    assert pid in {w["pid"] for w in pool.workers()}
    with pytest.raises(ValueError):  # the target's own exception comes back (json.JSONDecodeError)
        pool.call_on_worker("json:loads", {"s": "{"})
    assert all(w["state"] == "idle" for w in pool.workers())

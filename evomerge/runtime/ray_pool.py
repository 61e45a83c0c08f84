"""A pool of Ray actors, each owning one resident evaluator, fed jobs as they free up (no generation barrier).

:class:`RayExecutor` keeps ``workers`` actors, each building its evaluator once from an
:class:`~evomerge.runtime.jobs.EvaluatorSpec`. It has no thread of its own: like Ray Tune's actor
manager, it moves only when called. ``submit`` hands the job to an idle worker (or queues it);
``next_outcome`` waits in ``ray.wait`` (bounded by its timeout and by the nearest job or start
deadline), then takes in what finished, enforces the per-job timeout, replaces workers that died or
timed out, and hands queued jobs (retries) to whichever worker is free. A job whose worker died or
timed out is retried once on another worker before it comes back as failed; a slot whose
replacement keeps failing to start is retired (capacity shrinks by one). With ``lanes=2``
(``runtime.overlap``) each actor runs two jobs at once in two threads, its evaluator merging one
candidate while it scores the other. The search driver waits in
``next_outcome`` whenever jobs are out, so this feeds workers as promptly as a dispatcher thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from evomerge.eval.result import CandidateResult
from evomerge.runtime.jobs import EvaluatorSpec, Job, Outcome, recipe_hash, run_job
from evomerge.runtime.local_ray import connect_ray

log = logging.getLogger(__name__)

__all__ = ["RayExecutor"]


class _Worker:
    """The actor body: owns one evaluator for its whole life (made a Ray actor in ``_actor_class``)."""

    def __init__(self, spec: EvaluatorSpec, threads: int | None, name: str):
        self.name = name
        self.evaluator = spec.build()
        if threads and "torch" in sys.modules:  # an evaluator that scores models has loaded torch by now
            sys.modules["torch"].set_num_threads(threads)

    def ready(self) -> dict[str, Any]:
        import ray

        return {
            "name": self.name,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": getattr(self.evaluator, "device", None),
        }

    def evaluate(self, job: Job) -> CandidateResult:
        return run_job(self.evaluator, job)

    def call(self, target: str, kwargs: dict[str, Any]) -> Any:
        """Run ``target`` (``"module:function"``) here: one-off work that needs a worker's resources."""
        from evomerge.runtime.jobs import import_callable

        return import_callable(target)(**kwargs)


_ACTOR_CLASS: Any = None


def _actor_class() -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(max_restarts=0, max_task_retries=0)(_Worker)
    return _ACTOR_CLASS


@dataclass
class _Run:
    """One job attempt running on a worker."""

    job: Job
    tries: int
    history: list[str]
    started: float
    deadline: float | None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _death_cause(exc: BaseException) -> str:
    """A one-line account of why an actor is gone (Ray's messages run to a paragraph)."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "creation task" in text and lines:  # the evaluator's constructor raised: its exception is last
        return f"building the evaluator failed: {lines[-1][:300]}"
    m = re.search(r"Worker exit type: (\S+) Worker exit detail: (.*?)(?:\s+Some common causes|$)", text, re.S)
    if m:
        return f"process exited ({m.group(1)}: {' '.join(m.group(2).split())[:300]})"
    m = re.search(r"The actor (?:is dead|died) because (.*)", text)
    line = m.group(1) if m else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


@dataclass
class _Slot:
    """One worker place in the pool: the actor now in it and the job (attempt) it is running."""

    index: int
    name: str = ""
    actor: Any = None
    state: str = "starting"  # starting | idle | busy (a job or more) | reserved (call_on_worker) | dead
    node: str | None = None  # the Ray node id the actor runs on (once ready)

    @property
    def label(self) -> str:
        """The worker as records name it: the actor and, on a cluster, which node (``ray-actor-3@1a2b3c4d``)."""
        return f"{self.name}@{self.node[:8]}" if self.node else self.name

    ready_ref: Any = None
    runs: dict[Any, _Run] = field(default_factory=dict)
    """The jobs running on the actor, by their Ray object ref (at most the pool's ``lanes``)."""
    deadline: float | None = None
    """While starting: when the actor must be up."""
    start_failures: int = 0
    pid: int | None = None


class RayExecutor:
    """A pool of Ray actors, each owning one evaluator; jobs go to whichever worker frees up first.

    Not thread-safe, and needs none: every method runs in the caller's thread, and the pool advances
    (collects, expires, replaces, dispatches) only inside ``submit``, ``next_outcome`` and ``workers``.
    """

    MAX_START_FAILURES = 3

    def __init__(
        self,
        spec: EvaluatorSpec,
        workers: int | None = None,
        *,
        address: str | None = None,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
        timeout: float | None = None,
        retries: int = 1,
        runtime_env: dict | None = None,
        startup_timeout: float | None = 600.0,
        quiet: bool = True,
        lanes: int = 1,
    ):
        """Connect to (or start) Ray, start ``workers`` actors (default: as many as fit) and wait until
        each has built its evaluator, so that a broken spec fails here rather than on every job."""
        import ray

        if cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")
        if gpus_per_worker < 0:
            raise ValueError("gpus_per_worker must be >= 0")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds (or None for no limit)")
        if lanes < 1:
            raise ValueError("lanes must be >= 1 (jobs one worker runs at once)")
        if workers is not None and workers < 1:
            raise ValueError("workers must be >= 1 (use InProcessExecutor for 0)")
        self.spec = spec
        self.timeout = timeout
        self.retries = retries
        self.lanes = lanes
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.runtime_env = runtime_env
        self.threads = spec.threads or max(1, int(cpus_per_worker))
        self.startup_timeout = startup_timeout
        self._owns_ray = connect_ray(address, quiet=quiet)
        try:
            resources = ray.cluster_resources()
            fit = int(resources.get("CPU", 0) // cpus_per_worker)
            if gpus_per_worker > 0:
                fit = min(fit, int(resources.get("GPU", 0) // gpus_per_worker))
            if workers is None:
                if fit < 1:
                    raise ValueError(
                        f"the Ray cluster has {resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} "
                        f"GPUs: not enough for one worker ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU)"
                    )
                workers = fit
            elif workers > fit:
                msg = (
                    f"{workers} workers × ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU) exceed the "
                    f"Ray cluster's {resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs"
                )
                if self._owns_ray:
                    raise ValueError(msg)
                log.warning("%s; the extra workers wait for the cluster to grow", msg)
        except BaseException:
            self._stop_ray()
            raise

        self._queue: collections.deque[tuple[Job, int, list[str]]] = collections.deque()
        """Jobs waiting for a free worker: (job, retries so far, why earlier attempts failed)."""
        self._outcomes: collections.deque[Outcome] = collections.deque()
        self._refs: dict[Any, _Slot] = {}
        """Every Ray object ref being waited on (an actor's ``ready`` or a job), to its slot."""
        self._slots = [_Slot(i) for i in range(workers)]
        self._names = 0
        self._unfinished = 0
        self._closed = False
        self._t0: float | None = None
        self._busy = 0.0
        self._dead_seconds = 0.0

        for slot in self._slots:
            self._start_actor(slot)
        try:
            self._await_initial_workers(startup_timeout)
        except BaseException:
            self.shutdown()
            raise

    # --- public ----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:  # type: ignore[override]
        """Jobs that can run at once: ``lanes`` per worker slot not retired."""
        return self.lanes * sum(1 for s in self._slots if s.state != "dead")

    def workers(self) -> list[dict[str, Any]]:
        """Name, state, pid and Ray node id of each worker slot (for logs and tests); takes in what Ray has
        finished first (without waiting), so that a replacement that is up shows as idle."""
        if not self._closed:
            self._advance(0.0)
        return [{"slot": s.index, "name": s.name, "state": s.state, "pid": s.pid, "node": s.node} for s in self._slots]

    def call_on_worker(self, target: str, kwargs: dict[str, Any]) -> tuple[Any, str]:
        """Run ``target`` (``"module:function"``) with ``kwargs`` on one idle worker, with that worker's
        CPUs and GPU, and return its result and the worker's label. For one-off work before candidates
        are scored (the gradient optimizer's fit); nothing is dispatched to that worker meanwhile. An
        exception raised by ``target`` is raised here; a worker that dies raises ``RuntimeError``."""
        import ray

        if self._closed:
            raise RuntimeError("executor is shut down")
        while (slot := next((s for s in self._slots if s.state == "idle"), None)) is None:
            if not any(s.state != "dead" for s in self._slots):
                raise RuntimeError(f"{target}: no workers left (every worker slot failed to start)")
            self._advance(1.0)
        slot.state = "reserved"
        try:
            return ray.get(slot.actor.call.remote(target, kwargs)), slot.label
        except ray.exceptions.RayActorError as exc:
            label = slot.label
            self._replace(slot)  # a fresh actor takes the slot, as after a death mid-candidate
            raise RuntimeError(f"{label} died while running {target}: {_death_cause(exc)}") from None
        finally:
            if slot.state == "reserved":
                slot.state = "idle"

    def submit(self, job: Job) -> None:
        """Queue ``job`` and hand it to an idle worker if there is one; returns at once."""
        if self._closed:
            raise RuntimeError("executor is shut down")
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._unfinished += 1
        if not any(s.state != "dead" for s in self._slots):
            self._fail(job, ["no workers left (every worker slot failed to start)"], "none", 0.0)
            return
        self._queue.append((job, 0, []))
        self._dispatch()

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        """The next finished job (in completion order); ``None`` after ``timeout`` s or when nothing is pending.

        While it waits, the pool does its work: results come in, deadlines are enforced, dead
        workers are replaced and retries dispatched.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._outcomes:
                self._unfinished -= 1
                return self._outcomes.popleft()
            if self._unfinished == 0 or self._closed or not self._refs:
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._advance(left)  # ray.wait is interruptible: Ctrl-C gets through at once
            if left == 0.0 and not self._outcomes:
                return None

    def pending(self) -> int:
        """Jobs submitted whose outcome has not been taken by ``next_outcome`` yet."""
        return self._unfinished

    def idle_fraction(self) -> float:
        """Share of worker-seconds since the first submit in which a worker had no job (per lane).

        A job counts as running until its result is taken in, so one that finishes while the
        driver is busy between calls counts as running until the driver calls again.
        """
        if self._t0 is None:
            return 1.0
        now = time.monotonic()
        elapsed = now - self._t0
        live = sum(1 for s in self._slots if s.state != "dead")
        total = self.lanes * (live * elapsed + self._dead_seconds)
        busy = self._busy + sum(now - run.started for s in self._slots for run in s.runs.values())
        return min(1.0, max(0.0, 1.0 - busy / total)) if total > 0 else 0.0

    def shutdown(self) -> None:
        """Kill every actor (results not taken are dropped) and stop the Ray this pool started."""
        import ray

        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # already gone, or Ray is going down
                    pass
            slot.actor = None
            slot.state = "dead"
        self._refs.clear()
        self._stop_ray()

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- actors ----------------------------------------------------------------------------------
    def _stop_ray(self) -> None:
        import ray

        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def _start_actor(self, slot: _Slot) -> None:
        self._names += 1
        slot.name = f"ray-actor-{self._names}"
        options: dict[str, Any] = {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker}
        if self.lanes > 1:  # a threaded actor: its jobs run side by side
            options["max_concurrency"] = self.lanes
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        slot.actor = _actor_class().options(**options).remote(self.spec, self.threads, slot.name)
        slot.state = "starting"
        slot.pid = None
        slot.node = None
        slot.deadline = None if self.startup_timeout is None else time.monotonic() + self.startup_timeout
        slot.ready_ref = slot.actor.ready.remote()
        self._refs[slot.ready_ref] = slot

    def _kill(self, slot: _Slot) -> None:
        import ray

        for ref in (slot.ready_ref, *slot.runs):
            if ref is not None:
                self._refs.pop(ref, None)
        slot.ready_ref = None
        slot.runs = {}
        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        slot.actor = None

    def _await_initial_workers(self, startup_timeout: float | None) -> None:
        import ray

        deadline = None if startup_timeout is None else time.monotonic() + startup_timeout
        refs = {s.ready_ref: s for s in self._slots}
        remaining = list(refs)
        while remaining:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=wait)
            for ref in done:
                slot = refs[ref]
                try:
                    info = ray.get(ref)
                except Exception as exc:
                    raise RuntimeError(f"worker {slot.name} failed to start: {_death_cause(exc)}") from exc
                self._refs.pop(ref, None)
                slot.ready_ref = None
                slot.state = "idle"
                slot.deadline = None
                slot.pid = info.get("pid")
                slot.node = info.get("node_id")
            if remaining and deadline is not None and time.monotonic() >= deadline:
                names = ", ".join(refs[r].name for r in remaining)
                raise TimeoutError(
                    f"workers not ready after {startup_timeout:g} s ({names}); "
                    "the cluster may lack the requested CPUs/GPUs"
                )

    # --- the pool's one step -----------------------------------------------------------------------
    def _advance(self, wait: float | None) -> None:
        """Dispatch, wait up to ``wait`` s (``None``: until something finishes; less if a deadline
        comes first) for anything Ray finishes, take in all that finished, enforce deadlines, and
        dispatch again to the workers freed."""
        import ray

        self._dispatch()
        refs = list(self._refs)
        if refs:
            deadlines = [s.deadline for s in self._slots if s.deadline is not None]
            deadlines += [run.deadline for s in self._slots for run in s.runs.values() if run.deadline is not None]
            if deadlines:
                until = max(0.0, min(deadlines) - time.monotonic())
                wait = until if wait is None else min(wait, until)
            done, _ = ray.wait(refs, num_returns=1, timeout=wait)
            if done:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                self._collect(ref)
        self._expire()
        self._dispatch()

    def _dispatch(self) -> None:
        """Give queued jobs to workers with a free lane, the least busy first (so that with two lanes
        every worker gets a job before any gets a second). A job sent to a worker that already runs
        others may wait for them at the evaluator's locks, so its deadline is the timeout once more
        for each of them."""
        while self._queue:
            free = [s for s in self._slots if s.state in ("idle", "busy") and len(s.runs) < self.lanes]
            if not free:
                return
            slot = min(free, key=lambda s: (len(s.runs), s.index))
            job, tries, history = self._queue.popleft()
            started = time.monotonic()
            deadline = None if self.timeout is None else started + self.timeout * (1 + len(slot.runs))
            ref = slot.actor.evaluate.remote(job)
            slot.runs[ref] = _Run(job, tries, history, started, deadline)
            slot.state = "busy"
            self._refs[ref] = slot

    def _collect(self, ref: Any) -> None:
        import ray

        slot = self._refs.pop(ref, None)
        if slot is None:  # an attempt killed in this round: its result is dropped
            return
        try:
            value = ray.get(ref)
            error: BaseException | None = None
        except Exception as exc:
            value, error = None, exc
        if slot.ready_ref is not None and ref == slot.ready_ref:
            self._worker_started(slot, value, error)
        elif ref in slot.runs:
            self._job_finished(slot, slot.runs.pop(ref), value, error)

    def _worker_started(self, slot: _Slot, info: Any, error: BaseException | None) -> None:
        slot.ready_ref = None
        slot.deadline = None
        if error is None:
            slot.state = "idle"
            slot.start_failures = 0
            slot.pid = info.get("pid") if isinstance(info, dict) else None
            slot.node = info.get("node_id") if isinstance(info, dict) else None
            return
        slot.start_failures += 1
        log.warning(
            "replacement worker %s failed to start (%d in a row): %s",
            slot.name,
            slot.start_failures,
            _death_cause(error),
        )
        self._kill(slot)
        if slot.start_failures < self.MAX_START_FAILURES:
            self._start_actor(slot)
            return
        self._retire(
            slot, f"worker slot {slot.index} failed to start {slot.start_failures} times: {_death_cause(error)}"
        )

    def _retire(self, slot: _Slot, why: str) -> None:
        """Give up on a slot (capacity shrinks); with no slot left, every queued job fails."""
        log.error("%s; running with one worker fewer", why)
        if self._t0 is not None:
            self._dead_seconds += time.monotonic() - self._t0
        slot.state = "dead"
        if any(s.state != "dead" for s in self._slots):
            return
        while self._queue:
            job, tries, history = self._queue.popleft()
            self._fail(job, history + [f"no workers left ({why})"], "none", 0.0)

    def _job_finished(self, slot: _Slot, run: _Run, result: Any, error: BaseException | None) -> None:
        import ray

        seconds = time.monotonic() - run.started
        self._busy += seconds
        if not slot.runs:
            slot.state = "idle"
        if error is None:
            self._outcomes.append(Outcome(run.job, result, slot.label))
            return
        if isinstance(error, ray.exceptions.RayTaskError) and not isinstance(error, ray.exceptions.RayActorError):
            # The method raised (run_job catches evaluator errors, so e.g. an unpicklable result):
            # deterministic, so the worker lives on and the job is not retried.
            cause = error.cause if getattr(error, "cause", None) is not None else error
            self._fail(
                run.job,
                run.history + [f"worker error on {slot.name}: {type(cause).__name__}: {cause}"],
                slot.name,
                seconds,
            )
            return
        why = f"worker died: {slot.name} (pid {slot.pid}): {_death_cause(error)}"
        log.warning("candidate %s attempt %d: %s", run.job.candidate_id, run.job.attempt, why)
        self._lose_worker(slot, run, why, seconds, blame_all=True)

    def _expire(self) -> None:
        """Time out jobs past their deadline and actors that did not start in time."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.state == "starting" and slot.deadline is not None and now >= slot.deadline:
                self._refs.pop(slot.ready_ref, None)
                self._worker_started(
                    slot,
                    None,
                    TimeoutError(f"{slot.name} did not build its evaluator within {self.startup_timeout:g} s"),
                )
                continue
            late = next(
                (ref for ref, run in slot.runs.items() if run.deadline is not None and now >= run.deadline), None
            )
            if late is None:
                continue
            run = slot.runs.pop(late)
            self._refs.pop(late, None)
            seconds = now - run.started
            self._busy += seconds
            why = f"timeout: no result from {slot.name} within {self.timeout:g} s"
            log.warning("candidate %s attempt %d: %s; killing the worker", run.job.candidate_id, run.job.attempt, why)
            self._lose_worker(slot, run, why, seconds)

    def _lose_worker(self, slot: _Slot, run: _Run, why: str, seconds: float, *, blame_all: bool = False) -> None:
        """The worker died or timed out on ``run``: a fresh actor takes the slot and ``run`` is retried (or
        fails). The jobs running beside it on the lost actor are retried too; a death (``blame_all``)
        cannot be pinned on one of them, so each spends a retry, while after a timeout they go back to
        the queue as they were."""
        name = slot.name
        beside = list(slot.runs.values())
        now = time.monotonic()
        for other in beside:
            self._busy += now - other.started
        self._replace(slot)
        for other in reversed(beside):
            if blame_all:
                self._retry_or_fail(other.job, other.tries, other.history + [why], name, now - other.started)
            else:
                lost = f"lost with {name} ({why}) while another candidate ran on it"
                self._queue.appendleft((other.job, other.tries, other.history + [lost]))
        self._retry_or_fail(run.job, run.tries, run.history + [why], name, seconds)

    def _replace(self, slot: _Slot) -> None:
        """Kill the slot's actor (its pending results are dropped) and start a fresh one."""
        self._kill(slot)
        self._start_actor(slot)

    def _retry_or_fail(self, job: Job, tries: int, history: list[str], worker: str, seconds: float) -> None:
        if tries < self.retries and any(s.state != "dead" for s in self._slots):
            self._queue.appendleft((dataclasses.replace(job, attempt=job.attempt + 1), tries + 1, history))
            self._dispatch()
        else:
            self._fail(job, history, worker, seconds)

    def _fail(self, job: Job, history: list[str], worker: str, seconds: float) -> None:
        last = history[-1] if history else "failed"
        reason = last
        if len(history) > 1:
            reason = f"{last} (after {len(history)} attempts; earlier: {'; '.join(history[:-1])})"
        result = CandidateResult(recipe_hash(job.recipe), "failed", reason=reason, seconds=seconds)
        self._outcomes.append(Outcome(job, result, worker))

"""Executors: run candidate jobs on workers that each own one resident ``CandidateEvaluator``.

The search driver talks to one small interface (:class:`Executor`): ``submit`` jobs, take
``next_outcome`` as each finishes, ask ``pending`` / ``capacity`` / ``idle_fraction``, ``shutdown``.

* :class:`InProcessExecutor` (``--workers 0``) evaluates in ``submit`` itself, in the driver process.
* :class:`RayExecutor` keeps ``workers`` Ray actors, each building its evaluator once from an
  :class:`EvaluatorSpec`. A dispatcher thread hands the next queued job to whichever actor frees up
  (no generation barrier), enforces the per-job timeout, and replaces actors that die or time out;
  such a job is retried once on another worker before it comes back as failed.

Only small things cross process boundaries: the spec, the job (a recipe dict) and the
``CandidateResult``. Weights never go through the object store.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import queue
import re
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from evomerge.eval.evaluator import CandidateResult

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


# --- what travels to a worker --------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluatorSpec:
    """Everything a worker needs to build its evaluator; small and picklable."""

    objectives: list[dict]
    """``Objective.model_dump()`` dicts."""
    include_paths: list[str] = field(default_factory=list)
    backend: str = "fast"
    device: str | None = None
    """``None``: CUDA when the worker sees a GPU, else CPU."""
    seed: int = 0
    threads: int | None = None
    """``torch.set_num_threads`` in the worker; ``None``: the CPUs reserved per worker (Ray) or
    left as it is (in-process)."""
    base_dir: str | None = None
    """Directory that relative model paths in recipes are resolved against (workers on other
    machines have another working directory; prefer absolute paths)."""
    factory: str | None = None
    """``"module:function"``; when set, ``build`` returns ``function(spec)`` instead of a
    ``CandidateEvaluator`` (anything with ``evaluate(recipe) -> CandidateResult``; tests use this)."""

    def build(self) -> Any:
        """The evaluator this spec describes (a ``CandidateEvaluator`` unless ``factory`` is set)."""
        if self.factory:
            return _import_callable(self.factory)(self)
        from evomerge.eval.evaluator import CandidateEvaluator
        from evomerge.eval.tasks import Objective

        return CandidateEvaluator(
            [Objective.model_validate(o) for o in self.objectives],
            include_paths=list(self.include_paths),
            backend=self.backend,  # type: ignore[arg-type]
            device=self.device,
            seed=self.seed,
            base_dir=Path(self.base_dir) if self.base_dir else None,
        )


def _import_callable(path: str) -> Any:
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"factory {path!r}: expected 'module:function'")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"factory {path!r} is not callable")
    return obj


@dataclass(frozen=True)
class Job:
    """One candidate to score."""

    candidate_id: int
    recipe: dict
    """``Recipe.to_dict()``; the worker rebuilds the ``Recipe``."""
    attempt: int = 0


@dataclass
class Outcome:
    """A finished job: its (last) attempt, the result and the worker that produced it."""

    job: Job
    result: CandidateResult
    worker: str


@runtime_checkable
class Executor(Protocol):
    @property
    def capacity(self) -> int:
        """How many jobs may be in flight at once (live workers)."""
        ...

    def submit(self, job: Job) -> None: ...

    def next_outcome(self, timeout: float | None = None) -> Outcome | None: ...

    def pending(self) -> int: ...

    def idle_fraction(self) -> float: ...

    def shutdown(self) -> None: ...


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """The recipe's content hash (as ``Recipe.content_hash``), also for recipes that do not validate."""
    from evomerge.recipe import Recipe, RecipeError

    try:
        return Recipe.from_dict(recipe).content_hash()
    except RecipeError:
        canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_job(evaluator: Any, job: Job) -> CandidateResult:
    """Evaluate one job; never raises (an invalid recipe or a raising evaluator is a failed result)."""
    from evomerge.recipe import Recipe, RecipeError

    start = time.perf_counter()
    try:
        recipe = Recipe.from_dict(job.recipe, source=f"candidate {job.candidate_id}")
    except RecipeError as exc:
        return CandidateResult(recipe_hash(job.recipe), "failed", reason=str(exc), seconds=time.perf_counter() - start)
    try:
        return evaluator.evaluate(recipe)
    except Exception as exc:  # evaluators should not raise; if one does, it is this candidate's failure
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
        return CandidateResult(
            recipe.content_hash(),
            "failed",
            reason=f"{type(exc).__name__}: {exc}{where}",
            seconds=time.perf_counter() - start,
        )


# --- in-process ----------------------------------------------------------------------------------
class InProcessExecutor:
    """Runs each job synchronously inside ``submit`` in this process (debugging, ``--workers 0``)."""

    worker_name = "inprocess"

    def __init__(self, spec: EvaluatorSpec, evaluator: Any = None):
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
        if self._closed:
            raise RuntimeError("executor is shut down")
        start = time.monotonic()
        if self._t0 is None:
            self._t0 = start
        result = run_job(self.evaluator, job)
        self._busy += time.monotonic() - start
        self._outcomes.append(Outcome(job, result, self.worker_name))

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        return self._outcomes.popleft() if self._outcomes else None

    def pending(self) -> int:
        return len(self._outcomes)

    def idle_fraction(self) -> float:
        if self._t0 is None:
            return 1.0
        total = time.monotonic() - self._t0
        return min(1.0, max(0.0, 1.0 - self._busy / total)) if total > 0 else 0.0

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            close = getattr(self.evaluator, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "InProcessExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# --- Ray -----------------------------------------------------------------------------------------
class _Worker:
    """The actor body: owns one evaluator for its whole life (made a Ray actor in ``_actor_class``)."""

    def __init__(self, spec: EvaluatorSpec, threads: int | None, name: str):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name = name
        self.evaluator = spec.build()

    def ready(self) -> dict[str, Any]:
        import ray

        return {
            "name": self.name,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "device": getattr(self.evaluator, "device", None),
        }

    def evaluate(self, job: Job) -> CandidateResult:
        return run_job(self.evaluator, job)


_ACTOR_CLASS: Any = None


def _actor_class() -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(max_restarts=0, max_task_retries=0)(_Worker)
    return _ACTOR_CLASS


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make a Ray started in this block take 127.0.0.1 as its node IP, so that it binds loopback only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray replaces a loopback node IP by
    the machine's routable address (``services.resolve_ip_for_localhost``) unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is false (the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch,
    read once at import). With a loopback node IP, GCS, raylet, object manager, core workers and the
    agents all bind 127.0.0.1. The switch is flipped only while this process starts its own Ray, so
    joining a real cluster later still reports a routable address.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # Ray changed; start_local_ray checks the result
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_local_ray(
    num_cpus: int | None = None, *, num_gpus: int | None = None, runtime_env: dict | None = None, quiet: bool = True
) -> None:
    """Start a private Ray in this process, bound to loopback only, sized to the machine by default."""
    import ray

    # Ray turns token authentication on for a local cluster and warns about it on every start; the
    # embedded Ray listens on loopback only and keeps the token, so the notice is noise there.
    token_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    saved_level = token_notice.level
    if quiet:
        token_notice.setLevel(logging.ERROR)
    try:
        with _loopback_node_ip():
            ray.init(
                address="local",  # never pick up RAY_ADDRESS or a running cluster here
                num_cpus=num_cpus if num_cpus is not None else machine_cpus(),
                num_gpus=num_gpus,
                include_dashboard=False,
                log_to_driver=not quiet,
                logging_level=logging.WARNING if quiet else logging.INFO,
                runtime_env=runtime_env,
                _node_ip_address=LOOPBACK,
            )
    finally:
        token_notice.setLevel(saved_level)
    node_ip = ray.util.get_node_ip_address()
    if not _is_loopback(node_ip):
        log.warning(
            "the local Ray took node IP %s instead of %s: its ports are reachable from the network", node_ip, LOOPBACK
        )


def connect_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Make sure this process is connected to Ray; True when it started the Ray (and must stop it).

    Already connected: reuse. ``address`` or ``RAY_ADDRESS``: join that cluster. Otherwise start a
    local, loopback-only Ray with ``num_cpus`` (default: this machine's CPUs).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
        return False
    start_local_ray(num_cpus, quiet=quiet)
    return True


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
    index: int
    name: str = ""
    actor: Any = None
    state: str = "starting"  # starting | idle | busy | dead
    ready_ref: Any = None
    job_ref: Any = None
    job: Job | None = None
    tries: int = 0
    history: list[str] = field(default_factory=list)
    started: float = 0.0
    deadline: float | None = None
    start_failures: int = 0
    pid: int | None = None


class RayExecutor:
    """A pool of Ray actors, each owning one evaluator; jobs go to whichever worker frees up first."""

    POLL_S = 0.05
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
    ):
        import ray

        if cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")
        if gpus_per_worker < 0:
            raise ValueError("gpus_per_worker must be >= 0")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds (or None for no limit)")
        if workers is not None and workers < 1:
            raise ValueError("workers must be >= 1 (use InProcessExecutor for 0)")
        self.spec = spec
        self.timeout = timeout
        self.retries = retries
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

        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[Job, int, list[str]]] = collections.deque()
        self._outcomes: queue.Queue[Outcome] = queue.Queue()
        self._refs: dict[Any, _Slot] = {}
        self._slots = [_Slot(i) for i in range(workers)]
        self._names = 0
        self._unfinished = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._closed = False
        self._t0: float | None = None
        self._busy = 0.0
        self._dead_seconds = 0.0

        with self._lock:
            for slot in self._slots:
                self._start_actor(slot)
        try:
            self._await_initial_workers(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self._thread = threading.Thread(target=self._run, name="evomerge-ray-dispatch", daemon=True)
        self._thread.start()

    # --- public ----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots if s.state != "dead")

    def workers(self) -> list[dict[str, Any]]:
        """Name, state and pid of each worker slot (for logs and tests)."""
        with self._lock:
            return [{"slot": s.index, "name": s.name, "state": s.state, "pid": s.pid} for s in self._slots]

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("executor is shut down")
            self._raise_if_broken()
            if self._t0 is None:
                self._t0 = time.monotonic()
            self._unfinished += 1
            if not any(s.state != "dead" for s in self._slots):
                self._fail(job, ["no workers left (every worker slot failed to start)"], "none", 0.0)
                return
            self._queue.append((job, 0, []))
            self._dispatch()
            self._wake.notify_all()

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        """The next finished job (in completion order); ``None`` after ``timeout`` s or when nothing is pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                self._raise_if_broken()
                with self._lock:
                    if self._unfinished == 0:
                        return None
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    return None
                try:
                    outcome = self._outcomes.get(timeout=wait)
                except queue.Empty:
                    continue
            with self._lock:
                self._unfinished -= 1
            return outcome

    def pending(self) -> int:
        """Jobs submitted whose outcome has not been taken by ``next_outcome`` yet."""
        with self._lock:
            return self._unfinished

    def idle_fraction(self) -> float:
        """Share of worker-seconds since the first submit in which a worker had no job."""
        with self._lock:
            if self._t0 is None:
                return 1.0
            now = time.monotonic()
            elapsed = now - self._t0
            live = sum(1 for s in self._slots if s.state != "dead")
            total = live * elapsed + self._dead_seconds
            busy = self._busy + sum(now - s.started for s in self._slots if s.state == "busy")
            return min(1.0, max(0.0, 1.0 - busy / total)) if total > 0 else 0.0

    def shutdown(self) -> None:
        import ray

        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._wake.notify_all()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=10)
        with self._lock:
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
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        slot.actor = _actor_class().options(**options).remote(self.spec, self.threads, slot.name)
        slot.state = "starting"
        slot.pid = None
        slot.deadline = None if self.startup_timeout is None else time.monotonic() + self.startup_timeout
        slot.ready_ref = slot.actor.ready.remote()
        self._refs[slot.ready_ref] = slot

    def _kill(self, slot: _Slot) -> None:
        import ray

        for ref in (slot.ready_ref, slot.job_ref):
            if ref is not None:
                self._refs.pop(ref, None)
        slot.ready_ref = slot.job_ref = None
        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        slot.actor = None

    def _await_initial_workers(self, startup_timeout: float | None) -> None:
        import ray

        deadline = None if startup_timeout is None else time.monotonic() + startup_timeout
        with self._lock:
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
                with self._lock:
                    self._refs.pop(ref, None)
                    slot.ready_ref = None
                    slot.state = "idle"
                    slot.deadline = None
                    slot.pid = info.get("pid")
            if remaining and deadline is not None and time.monotonic() >= deadline:
                names = ", ".join(refs[r].name for r in remaining)
                raise TimeoutError(
                    f"workers not ready after {startup_timeout:g} s ({names}); "
                    "the cluster may lack the requested CPUs/GPUs"
                )

    # --- dispatcher --------------------------------------------------------------------------------
    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the Ray dispatcher failed: {self._error!r}") from self._error

    def _dispatch(self) -> None:
        """Give queued jobs to idle workers (lock held)."""
        for slot in self._slots:
            if not self._queue:
                return
            if slot.state != "idle":
                continue
            job, tries, history = self._queue.popleft()
            slot.job, slot.tries, slot.history = job, tries, history
            slot.started = time.monotonic()
            slot.deadline = None if self.timeout is None else slot.started + self.timeout
            slot.job_ref = slot.actor.evaluate.remote(job)
            slot.state = "busy"
            self._refs[slot.job_ref] = slot

    def _run(self) -> None:
        import ray

        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    self._dispatch()
                    refs = list(self._refs)
                    now = time.monotonic()
                    deadlines = [s.deadline for s in self._slots if s.deadline is not None]
                    wait = self.POLL_S if not deadlines else max(0.0, min(self.POLL_S, min(deadlines) - now))
                    if not refs:
                        self._wake.wait(timeout=wait)
                        continue
                done, _ = ray.wait(refs, num_returns=1, timeout=wait)
                if done:
                    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in done:
                    self._collect(ref)
                self._expire()
        except BaseException as exc:  # surfaced to the driver by next_outcome/submit
            log.exception("Ray dispatcher failed")
            self._error = exc

    def _collect(self, ref: Any) -> None:
        import ray

        try:
            value = ray.get(ref)
            error: BaseException | None = None
        except Exception as exc:
            value, error = None, exc
        with self._lock:
            slot = self._refs.pop(ref, None)
            if slot is None or self._stopping:  # killed attempt or shutting down: its result is dropped
                return
            if slot.ready_ref is not None and ref == slot.ready_ref:
                self._worker_started(slot, value, error)
            elif slot.job_ref is not None and ref == slot.job_ref:
                self._job_finished(slot, value, error)

    def _worker_started(self, slot: _Slot, info: Any, error: BaseException | None) -> None:
        slot.ready_ref = None
        slot.deadline = None
        if error is None:
            slot.state = "idle"
            slot.start_failures = 0
            slot.pid = info.get("pid") if isinstance(info, dict) else None
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

    def _job_finished(self, slot: _Slot, result: Any, error: BaseException | None) -> None:
        import ray

        job, tries, history = slot.job, slot.tries, slot.history
        assert job is not None
        seconds = time.monotonic() - slot.started
        self._busy += seconds
        slot.job_ref = None
        slot.job = None
        slot.deadline = None
        if error is None:
            slot.state = "idle"
            self._outcomes.put(Outcome(job, result, slot.name))
            return
        if isinstance(error, ray.exceptions.RayTaskError) and not isinstance(error, ray.exceptions.RayActorError):
            # The method raised (run_job catches evaluator errors, so e.g. an unpicklable result):
            # deterministic, so the worker lives on and the job is not retried.
            slot.state = "idle"
            cause = error.cause if getattr(error, "cause", None) is not None else error
            self._fail(
                job, history + [f"worker error on {slot.name}: {type(cause).__name__}: {cause}"], slot.name, seconds
            )
            return
        name = slot.name
        why = f"worker died: {name} (pid {slot.pid}): {_death_cause(error)}"
        log.warning("candidate %s attempt %d: %s", job.candidate_id, job.attempt, why)
        self._replace(slot)
        self._retry_or_fail(job, tries, history + [why], name, seconds)

    def _expire(self) -> None:
        with self._lock:
            if self._stopping:
                return
            now = time.monotonic()
            for slot in self._slots:
                if slot.deadline is None or now < slot.deadline:
                    continue
                if slot.state == "starting":
                    self._refs.pop(slot.ready_ref, None)
                    self._worker_started(
                        slot,
                        None,
                        TimeoutError(f"{slot.name} did not build its evaluator within {self.startup_timeout:g} s"),
                    )
                    continue
                if slot.state != "busy":
                    continue
                job, tries, history = slot.job, slot.tries, slot.history
                assert job is not None
                seconds = now - slot.started
                self._busy += seconds
                name = slot.name
                why = f"timeout: no result from {name} within {self.timeout:g} s"
                log.warning("candidate %s attempt %d: %s; killing the worker", job.candidate_id, job.attempt, why)
                slot.job = None
                slot.deadline = None
                self._replace(slot)
                self._retry_or_fail(job, tries, history + [why], name, seconds)

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
        self._outcomes.put(Outcome(job, result, worker))


def make_executor(run: Any, *, address: str | None = None) -> Executor:
    """The executor a run config asks for: in-process (workers: 0) or a pool of Ray actors."""
    runtime = run.config.runtime
    spec = EvaluatorSpec(
        objectives=[o.model_dump() for o in run.objectives],
        include_paths=list(run.include_paths),
        backend=runtime.backend,
        device=runtime.device,
        base_dir=str(run.base_dir),
        factory=runtime.evaluator_factory,
    )
    if runtime.workers == 0:
        return InProcessExecutor(spec)
    return RayExecutor(
        spec,
        runtime.workers,
        address=address,
        gpus_per_worker=runtime.gpus_per_worker,
        cpus_per_worker=runtime.cpus_per_worker,
        timeout=runtime.timeout,
    )

"""Start a search the way ``evomerge search`` does, from Python: config, executor, tracking, checkpoints.

    from evomerge.launch import run_search
    summary = run_search("configs/zoo-ps-cma.yaml", run_dir="runs/x", overrides=["optimizer.budget=50"])

The CLI only parses options into this call and prints what it returns. Here the pieces are wired:
the resolved config, an executor (in-process, a local Ray on loopback, or ``ray_address``), an MLflow
tracker started once the run dir is known to be ours, and SIGTERM handled like Ctrl-C so that
``kill PID`` stops an overnight run cleanly; whatever happens, the executor is shut down and the
tracker's parent run closed with the run's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.search.config import ResolvedRun, load_run_config, parse_duration
from evomerge.search.driver import RunSummary, Search
from evomerge.search.rundir import RunDir


@dataclass(frozen=True)
class LaunchedRun:
    """What a search did, and where it lives."""

    summary: RunSummary
    run_dir: Path
    run: ResolvedRun


def default_run_dir(run: ResolvedRun, config: str | Path) -> Path:
    """``runs/<config name>``, relative to the working directory."""
    return Path("runs") / (run.config.name or Path(config).stem)


def run_search(
    config: str | Path,
    *,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    budget: int | None = None,
    progress: bool = False,
    ray_address: str | None = None,
    track: bool = True,
    stop_on_sigterm: bool = True,
) -> LaunchedRun:
    """Run (or ``resume``) the search a config describes until its budget, time limit or an interrupt.

    ``overrides`` are ``key=value`` config overrides (dotted keys), as ``--set``. Raises ConfigError or
    SearchError for input the user can fix; Ctrl-C (and SIGTERM, from the main thread) ends the run
    with ``summary.stopped == "interrupted"`` and everything needed to resume saved.
    """
    from evomerge.runtime import make_executor

    run = load_run_config(config, list(overrides))
    seconds = parse_duration(run.config.runtime.time_limit)
    directory = RunDir(run_dir or default_run_dir(run, config))
    address = ray_address or run.config.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    job = Search(run, directory, None, budget=budget, time_limit=seconds, progress=progress)
    job.check(resume)  # a run that cannot start is refused before any worker starts
    job.executor = make_executor(run, address=address)
    tracker = None
    if track:
        from evomerge.tracking.tracker import Tracker

        tracker = Tracker.from_config(run.to_dict(), directory.path)
    started: list[bool] = []

    def start_tracking() -> None:  # only once the run dir is known to be ours
        if tracker is not None:
            tracker.start(resume=resume)
            started.append(True)

    status = "FAILED"
    try:
        if tracker is not None:
            job.on_record, job.on_generation = tracker.on_record, tracker.on_generation
        job.on_start = start_tracking
        with signals_as_interrupt(signal.SIGTERM) if stop_on_sigterm else contextlib.nullcontext():
            summary = job.execute(resume=resume)
        status = "KILLED" if summary.stopped == "interrupted" else "FINISHED"
    finally:
        job.executor.shutdown()
        if tracker is not None and started:
            tracker.close(status)
    return LaunchedRun(summary, directory.path, run)


@contextlib.contextmanager
def signals_as_interrupt(*signals: int) -> Iterator[None]:
    """While the block runs, these signals stop it the way Ctrl-C does (KeyboardInterrupt), so the
    command cleans up (saves state, stops servers) instead of dying on the spot. Only the main thread
    can set handlers; elsewhere this does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The search loop: ask -> decode -> dispatch -> record -> tell, checkpointed at every step.

Workers are kept busy within a generation: candidates are handed out as soon as a worker frees up.
For CMA-ES and NSGA-II the optimizer needs a whole generation's values before it can propose the next
one, so a generation is a barrier; we evaluate each generation in parallel rather than asking the next
population early, because asking early would make the sequence of candidates depend on timing and
break "same seed, same scores, same candidates" (and exact resume). The idle time this costs is the
tail of each generation (population ≥ 2× workers keeps it small) and is measured by the benchmark.

Stops at the candidate budget, the time limit (in-flight candidates finish, nothing new starts), or
Ctrl-C; in every case the run directory holds everything needed to ``--resume``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.search.config import ResolvedRun
from evomerge.search.front import to_minimize
from evomerge.search.optimizers import make_optimizer
from evomerge.search.report import RunReport, legacy_direction
from evomerge.search.rundir import RunDir, SearchState
from evomerge.search.genome import DFSGenome, PSGenome, make_genome

RecordHook = Callable[[dict[str, Any]], None]


class SearchError(RuntimeError):
    """A run that cannot start or continue (e.g. resuming a different config)."""


@dataclass
class RunSummary:
    evaluated: int
    failed: int
    cached: int
    stopped: str
    seconds: float
    best: dict[str, Any] | None
    front: list[dict[str, Any]] = field(default_factory=list)


class Search:
    def __init__(
        self,
        run: ResolvedRun,
        run_dir: RunDir,
        executor: Any,
        *,
        budget: int | None = None,
        time_limit: float | None = None,
        on_record: RecordHook | None = None,
        on_generation: Callable[[int], None] | None = None,
        on_start: Callable[[], None] | None = None,
        progress: bool = False,
    ):
        self.run = run
        self.run_dir = run_dir
        self.executor = executor
        self.budget = run.config.optimizer.budget if budget is None else budget
        if self.budget < 1:
            raise SearchError(f"budget: {self.budget} candidates; give at least 1 (the total to score, resumed ones included)")
        self.time_limit = time_limit
        self.on_record = on_record
        self.on_generation = on_generation
        self.on_start = on_start
        self.progress = progress
        self._genome: PSGenome | DFSGenome | None = None  # made by start(), once earlier stages are merged
        self.labels = [o.label for o in run.objectives]

    @property
    def genome(self) -> PSGenome | DFSGenome:
        if self._genome is None:
            raise RuntimeError("Search.start() makes the genome (after merging earlier stages)")
        return self._genome

    # --- setup ---------------------------------------------------------------------------------------
    def _new_state(self) -> SearchState:
        opt = self.run.config.optimizer
        optimizer = make_optimizer(
            opt.name, self.genome.dim, len(self.labels), population=opt.population, seed=opt.seed,
            weights=self.run.weights, sigma=opt.sigma, scalarize=opt.scalarize,
        )
        return SearchState(optimizer=optimizer)

    def start(self, resume: bool) -> SearchState:
        """Check the run dir, merge the earlier stages the space reads, and load or make the state."""
        self.run.materialize_stages()
        self._genome = make_genome(self.run.space)
        if resume:
            if not self.run_dir.exists():
                raise SearchError(f"{self.run_dir.path}: nothing to resume (no state or evaluations.jsonl)")
            saved = self.run_dir.read_config()
            now = self.run.to_dict()
            for objective in saved.get("objectives") or []:  # round-1 run dirs saved no direction
                objective["direction"] = objective.get("direction") or legacy_direction(objective.get("metric"))
            for key in ("search_space", "objectives"):
                if saved.get(key) != now.get(key):
                    raise SearchError(f"--resume: the {key} differs from the run in {self.run_dir.path}; use a new --run-dir")
            if saved.get("optimizer", {}).get("name") != now["optimizer"]["name"] or saved["optimizer"]["seed"] != now["optimizer"]["seed"]:
                raise SearchError(f"--resume: the optimizer or seed differs from the run in {self.run_dir.path}")
            self.run_dir.repair()
            state = self.run_dir.load_state() or self._new_state()
        else:
            if self.run_dir.exists():
                raise SearchError(f"{self.run_dir.path}: already holds a run; pass --resume to continue it, or choose another --run-dir")
            state = self._new_state()
        self.run_dir.write_config(self.run.to_dict())
        self.run_dir.save_state(state)
        return state

    # --- the loop ------------------------------------------------------------------------------------
    def execute(self, resume: bool = False) -> RunSummary:
        state = self.start(resume)
        if self.on_start is not None:
            self.on_start()
        started = time.monotonic()
        deadline = started + self.time_limit if self.time_limit else math.inf
        records = {r["id"]: r for r in self.run_dir.records()}
        by_hash = {r["recipe_hash"]: r for r in records.values() if r["status"] == "ok"}
        in_flight: dict[int, tuple[np.ndarray, str]] = {}
        waiting: dict[str, list[tuple[int, np.ndarray]]] = {}
        stopped = "budget"
        bar = _Progress(self.progress, self.budget, len(records), self._best_text(records))
        try:
            while True:
                if state.pending_X is None:
                    if len(records) >= self.budget:
                        break
                    X = state.optimizer.ask()
                    state.pending_X = X
                    state.pending_ids = list(range(state.next_id, state.next_id + len(X)))
                    state.next_id += len(X)
                    self.run_dir.save_state(state)
                # dispatch what the pending generation still needs, up to the executor's capacity
                for cid, x in zip(state.pending_ids, state.pending_X):
                    if cid in records or cid in in_flight or any(cid == w for ws in waiting.values() for w, _ in ws):
                        continue
                    if len(records) + len(in_flight) + sum(map(len, waiting.values())) >= self.budget:
                        break
                    if time.monotonic() >= deadline or len(in_flight) >= self.executor.capacity:
                        break
                    recipe = self.genome.decode(x)
                    digest = recipe.content_hash()
                    if digest in by_hash:
                        self._record(records, by_hash, self._cached(by_hash[digest], cid, state, x), bar)
                        continue
                    if any(h == digest for _, h in in_flight.values()):
                        waiting.setdefault(digest, []).append((cid, x))
                        continue
                    from evomerge.runtime.executor import Job

                    self.executor.submit(Job(candidate_id=cid, recipe=recipe.to_dict()))
                    in_flight[cid] = (x, digest)
                if not in_flight:
                    if all(cid in records for cid in state.pending_ids):
                        self._tell(state, records)
                        continue
                    stopped = "time limit" if time.monotonic() >= deadline else "budget"
                    break
                outcome = self.executor.next_outcome(timeout=1.0)
                if outcome is None:
                    continue
                cid = outcome.job.candidate_id
                x, digest = in_flight.pop(cid)
                record = self._make_record(cid, state, x, digest, outcome)
                self._record(records, by_hash, record, bar)
                for other, other_x in waiting.pop(digest, []):
                    if record["status"] == "ok":
                        self._record(records, by_hash, self._cached(record, other, state, other_x), bar)
                    else:  # the original failed: score the duplicate itself
                        self.executor.submit(Job(candidate_id=other, recipe=record["recipe"]))
                        in_flight[other] = (other_x, digest)
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            bar.close()
        return self._summary(records, stopped, time.monotonic() - started)

    # --- helpers ------------------------------------------------------------------------------------
    def _tell(self, state: SearchState, records: dict[int, dict[str, Any]]) -> None:
        rows = []
        for cid in state.pending_ids:
            record = records[cid]
            if record["status"] != "ok":
                rows.append([math.nan] * len(self.labels))
            else:
                rows.append([record["objectives"].get(label, math.nan) for label in self.labels])
        F = to_minimize(rows, self.run.directions)
        state.optimizer.tell(np.asarray(state.pending_X), F)
        generation = state.generation
        state.pending_X = None
        state.pending_ids = []
        state.generation += 1
        self.run_dir.save_state(state)
        if self.on_generation is not None:
            self.on_generation(generation)

    def _make_record(self, cid: int, state: SearchState, x: np.ndarray, digest: str, outcome: Any) -> dict[str, Any]:
        result = outcome.result
        return {
            "id": cid,
            "generation": state.generation,
            "genome": [round(float(v), 8) for v in x],
            "recipe_hash": digest,
            "recipe": self.genome.decode(x).to_dict(),
            "objectives": dict(result.objectives),
            "status": result.status,
            "reason": result.reason,
            "worker": outcome.worker,
            "seconds": round(result.seconds, 4),
            "materialize_seconds": round(result.materialize_seconds, 4),
            "score_seconds": round(result.score_seconds, 4),
            "cached": bool(result.cached),
            "attempts": outcome.job.attempt + 1,
            "time": time.time(),
        }

    def _cached(self, original: dict[str, Any], cid: int, state: SearchState, x: np.ndarray) -> dict[str, Any]:
        return {
            **original, "id": cid, "generation": state.generation, "genome": [round(float(v), 8) for v in x],
            "cached": True, "seconds": 0.0, "materialize_seconds": 0.0, "score_seconds": 0.0,
            "worker": "cache", "time": time.time(),
        }

    def _record(self, records, by_hash, record, bar) -> None:
        self.run_dir.append(record)
        records[record["id"]] = record
        if record["status"] == "ok":
            by_hash.setdefault(record["recipe_hash"], record)
        if self.on_record is not None:
            self.on_record(record)
        bar.advance(self._best_text(records))

    def _best_text(self, records: dict[int, dict[str, Any]]) -> str:
        best = self.report(records).best()
        if best is None:
            return "best: -"
        return "best: " + ", ".join(f"{k}={v:.3f}" for k, v in best["objectives"].items())

    def report(self, records: dict[int, dict[str, Any]]) -> RunReport:
        return RunReport(self.run.to_dict(), list(records.values()))

    def _summary(self, records: dict[int, dict[str, Any]], stopped: str, seconds: float) -> RunSummary:
        report = self.report(records)
        return RunSummary(
            evaluated=len(records),
            failed=sum(1 for r in records.values() if r["status"] != "ok"),
            cached=sum(1 for r in records.values() if r.get("cached")),
            stopped=stopped,
            seconds=seconds,
            best=report.best(),
            front=report.front(),
        )


class _Progress:
    """A rich progress bar (candidates done of budget, best so far, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int, text: str):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("search", total=total, completed=min(done, total), best=text)

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, best=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

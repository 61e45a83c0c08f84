"""The search loop: ask -> decode -> dispatch -> record -> tell, checkpointed at every step.

Two modes (``optimizer.mode``):

- ``barrier`` (the default): a generation is asked whole, its candidates are handed out as workers
  free up, and it is told whole. Same seed and same scores give the same candidates for any number of
  workers; the cost is each generation's tail, when workers wait for the slowest candidate.
- ``async``: one candidate is asked whenever a worker frees up and told as soon as its result
  arrives (steady-state NSGA-II, CMA-ES updating every ``population`` results). No worker waits on a
  barrier; the candidates depend on the order results arrive in, so a run is reproducible from its
  seed only with one worker (or in-process), but always resumable exactly: records are told in the
  order they are written to evaluations.jsonl, and a resumed run replays that order.

Stops at the candidate budget, the time limit (in-flight candidates finish, nothing new starts), or
Ctrl-C; in every case the run directory holds everything needed to ``--resume``.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.search.config import ResolvedRun
from evomerge.search.front import pareto_indices, to_minimize, weighted_score
from evomerge.search.genome import DFSGenome, MoEGenome, PSGenome, make_genome
from evomerge.search.optimizers import screened_below_full
from evomerge.search.record import CandidateRecord, CandidateStatus
from evomerge.search.registry import make_optimizer
from evomerge.search.report import RunReport, legacy_direction
from evomerge.search.rundir import RunDir, SearchState
from evomerge.search.space import MoESpace

RecordHook = Callable[[CandidateRecord], None]
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
"""Errors of the run dir's disk that stop a search cleanly (a SearchError) instead of with a traceback."""


class SearchError(RuntimeError):
    """A run that cannot start or continue (e.g. resuming a different config)."""


@dataclass
class RunSummary:
    evaluated: int
    failed: int
    cached: int
    stopped: str
    seconds: float
    best: CandidateRecord | None
    front: list[CandidateRecord] = field(default_factory=list)
    promoted: int = 0
    """Multi-fidelity runs: screened candidates also scored on every item (records of their own)."""


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
            raise SearchError(
                f"budget: {self.budget} candidates; give at least 1 (the total to score, resumed ones included)"
            )
        self.time_limit = time_limit
        self.on_record = on_record
        self.on_generation = on_generation
        self.on_start = on_start
        self.progress = progress
        self._best: CandidateRecord | None = None
        self._spent = 0
        """Candidates spent of the budget (recorded, promotions to full scoring not counted), kept as
        records arrive rather than recounted at every dispatch."""
        self._genome: PSGenome | DFSGenome | MoEGenome | None = None  # made by check(), once earlier stages are merged
        self._checked: bool | None = None  # the resume flag check() passed with
        self.labels = [o.label for o in run.objectives]

    @property
    def genome(self) -> PSGenome | DFSGenome | MoEGenome:
        if self._genome is None:
            raise RuntimeError("Search.check() makes the genome (after merging earlier stages)")
        return self._genome

    # --- setup ---------------------------------------------------------------------------------------
    def _new_state(self) -> SearchState:
        opt = self.run.config.optimizer
        try:
            fit = self._gradient_fit() if opt.name == "gradient" else None
            optimizer = make_optimizer(
                opt.name,
                self.genome.dim,
                len(self.labels),
                population=opt.population,
                seed=opt.seed,
                weights=self.run.weights,
                sigma=opt.sigma,
                x0=None if opt.x0 is None else [opt.x0] * self.genome.dim,
                initial=None if opt.initial is None else [[v] * self.genome.dim for v in opt.initial],
                scalarize=opt.scalarize,
                grid=opt.grid,
                fit=fit,
            )
        except ValueError as exc:  # e.g. a sweep over a space of 3 genes: names the field
            raise SearchError(f"{exc} (genes: {', '.join(self.genome.names)})") from None
        return SearchState(optimizer=optimizer)

    def _gradient_fit(self) -> Any:
        """The gradient optimizer's fit, before anything is scored: on a Ray worker when the run has them
        (its CPUs and GPU; a cluster's head need not have either), else in this process with a progress
        bar per step."""
        from evomerge.search.gradient import DEFAULT_LR, DEFAULT_STEPS, fit_run

        opt = self.run.config.optimizer
        steps = opt.steps or DEFAULT_STEPS
        options: dict[str, Any] = {
            "steps": steps,
            "lr": opt.lr or DEFAULT_LR,
            "points": min(self.budget, steps + 1),
            "start": None if opt.x0 is None else [opt.x0] * self.genome.dim,
            "scalarize": opt.scalarize,
            "loss": opt.loss or "nll",
        }
        on_worker = getattr(self.executor, "call_on_worker", None)
        if callable(on_worker):
            bar = _Progress(self.progress, 1, 0, f"fitting weights by gradient ({steps} steps) on a Ray worker")
            try:
                fit, worker = on_worker("evomerge.search.gradient:fit_run", {"run": self.run, **options})
                bar.advance(f"fit loss {fit.losses[-1]:.4f} on {worker}")
            finally:
                bar.close()
            fit.worker = worker
            return fit
        bar = _Progress(self.progress, steps + 1, 0, "fitting weights by gradient")
        try:
            return fit_run(self.run, progress=lambda step, loss: bar.advance(f"fit loss {loss:.4f}"), **options)
        finally:
            bar.close()

    def check(self, resume: bool) -> None:
        """Everything that can refuse the run, before a worker starts or the run dir is written: the
        earlier stages merged, the source checkpoints readable, the run dir new (or, to resume, readable
        and holding this same search). Idempotent; ``start`` runs it too."""
        if self._checked == resume:
            return
        self.run.materialize_stages()
        self._genome = make_genome(self.run.space)
        self._check_sources()
        if resume:
            if not self.run_dir.exists():
                raise SearchError(f"{self.run_dir.path}: nothing to resume (no state or evaluations.jsonl)")
            for _ in self.run_dir.records():  # refuse a damaged evaluations.jsonl before touching anything
                pass
            saved = self.run_dir.read_config()
            now = self.run.to_dict()
            for objective in saved.get("objectives") or []:  # round-1 run dirs saved no direction
                objective["direction"] = objective.get("direction") or legacy_direction(objective.get("metric"))
            saved["objectives"] = [_objective_with_defaults(o) for o in saved.get("objectives") or []]
            saved["search_space"] = _with_defaults(saved.get("search_space"))  # fields added since it was saved
            for key in ("search_space", "objectives"):
                if saved.get(key) != now.get(key):
                    raise SearchError(
                        f"--resume: the {key} differs from the run in {self.run_dir.path}; use a new --run-dir"
                    )
            before = saved.get("optimizer") or {}
            if (
                before.get("name") != now["optimizer"]["name"]
                or before.get("seed") != now["optimizer"]["seed"]
                or before.get("mode", "barrier") != now["optimizer"]["mode"]
            ):
                raise SearchError(
                    f"--resume: the optimizer, its seed or its mode differs from the run in {self.run_dir.path}"
                )
        elif self.run_dir.exists():
            raise SearchError(
                f"{self.run_dir.path}: already holds a run; pass --resume to continue it, or choose another --run-dir"
            )
        self._checked = resume

    def start(self, resume: bool) -> SearchState:
        """Check (see ``check``), then load or make the optimizer state and write the run's config."""
        self.check(resume)
        if resume:
            self.run_dir.repair()
            state = self.run_dir.load_state() or self._new_state()
        else:
            state = self._new_state()
        planned = state.optimizer.planned
        if planned is not None:
            self.budget = min(self.budget, planned)
        self.run_dir.write_config(self.run.to_dict())
        self.run_dir.save_state(state)
        return state

    def _check_sources(self) -> None:
        """Open every source checkpoint a candidate may read (headers, and file sizes against them) before
        anything is scored or written: a truncated or corrupted file is one error naming it, not a run of
        failed candidates."""

        from evomerge.merge.io import CheckpointError
        from evomerge.merge.plan import PlanError, open_checkpoint

        space = self.run.space
        if isinstance(space, MoESpace):  # every base choice and candidate expert
            refs: list[str] = [*space.base_model, *(e.source_model for e in space.experts)]
        else:
            base = getattr(space, "base_model", None)
            refs = [*space.models, *([str(base)] if base else [])]
        refs += [str(r) for r in self.genome.decode(np.full(self.genome.dim, 0.5)).referenced_models() if r]
        for ref in dict.fromkeys(refs):
            try:
                open_checkpoint(ref, base_dir=self.run.base_dir).close()
            except (CheckpointError, PlanError) as exc:
                raise SearchError(f"source model {ref}: {exc}") from None

    # --- the loop ------------------------------------------------------------------------------------
    def execute(self, resume: bool = False) -> RunSummary:
        state = self.start(resume)
        if self.on_start is not None:
            self.on_start()
        started = time.monotonic()
        deadline = started + self.time_limit if self.time_limit else math.inf
        records = {r.id: r for r in self.run_dir.records()}
        self._spent = sum(1 for r in records.values() if r.promoted_from is None)
        by_hash = {(r.recipe_hash, r.fidelity): r for r in records.values() if r.ok}
        self._best = self.report(records).best()
        stopped = "budget"
        bar = _Progress(self.progress, self.budget, self._spent, self._best_text())
        loop = self._steady_loop if self.run.config.optimizer.mode == "async" else self._generation_loop
        try:
            stopped = loop(state, records, by_hash, bar, deadline)
        except KeyboardInterrupt:
            stopped = "interrupted"
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            # every write is atomic (state) or one fsync'ed line (records; a torn last line is cut on
            # resume): what is on disk is a consistent run, to be continued once the disk takes writes
            raise SearchError(
                f"{self.run_dir.path}: cannot write ({exc.strerror}); the search stopped, nothing on disk is "
                "torn: free space (or make the run dir writable) and run the same command with --resume"
            ) from None
        finally:
            bar.close()
        return self._summary(records, stopped, time.monotonic() - started)

    def _generation_loop(
        self,
        state: SearchState,
        records: dict[int, CandidateRecord],
        by_hash: dict[tuple[str, str], CandidateRecord],
        bar: _Progress,
        deadline: float,
    ) -> str:
        """Barrier mode: ask a population, score it in parallel, tell it whole.

        A multi-fidelity run (``Objective.screen``) scores the generation on its screens first, then
        promotes the best share of it (by the optimizer's own ranking) to full scoring, and tells the
        optimizer both kinds of values apart (``screened_below_full``); when the run stops at its budget,
        screened candidates on the front are scored in full too (``_promote_front``)."""
        flight = _InFlight(self, state, by_hash, lambda record: self._record(records, by_hash, record, bar))
        screening = self.run.screening
        first = "screen" if screening else "full"
        while True:
            if state.pending_X is None:
                if state.optimizer.finished:
                    return "done"
                if self._spent >= self.budget:
                    return self._promote_front(state, records, flight, deadline) or "budget"
                X = state.optimizer.ask()
                state.pending_X = X
                state.pending_ids = list(range(state.next_id, state.next_id + len(X)))
                state.promotions = None
                state.next_id += len(X)
                self.run_dir.save_state(state)
            # dispatch what the pending generation still needs, up to the executor's capacity
            X_by_id = dict(zip(state.pending_ids, state.pending_X))
            jobs: list[tuple[int, int, str, int | None]] = [(cid, cid, first, None) for cid in state.pending_ids]
            jobs += [(fid, sid, "full", sid) for sid, fid in (state.promotions or {}).items()]
            for cid, source, fidelity, promoted_from in jobs:
                if cid in records or flight.busy(cid):
                    continue
                if promoted_from is None and self._spent + flight.proposals() >= self.budget:
                    break
                if time.monotonic() >= deadline or len(flight.in_flight) >= self.executor.capacity:
                    break
                flight.dispatch(cid, X_by_id[source], fidelity, promoted_from)
            if not flight.in_flight:
                if not all(cid in records for cid, *_ in jobs):  # stopped part-way through the generation
                    if time.monotonic() >= deadline:
                        return "time limit"
                    return self._promote_front(state, records, flight, deadline) or "budget"
                if screening and state.promotions is None:
                    state.promotions = self._promotions(state, records)
                    self.run_dir.save_state(state)
                    continue
                self._tell(state, records)
                continue
            outcome = self.executor.next_outcome(timeout=1.0)
            if outcome is not None:
                flight.take(outcome)

    def _promotions(self, state: SearchState, records: dict[int, CandidateRecord]) -> dict[int, int]:
        """The screened generation's best share (``optimizer.promote``, at least one), by the optimizer's
        own ranking of the screen scores, each given the id its full-fidelity record will have."""
        from evomerge.search.config import DEFAULT_PROMOTE

        done = {r.promoted_from: r.id for r in records.values() if r.promoted_from is not None}
        ok = [cid for cid in state.pending_ids if records[cid].ok]
        if not ok:
            return {}
        F = to_minimize(
            [[records[cid].objectives.get(label, math.nan) for label in self.labels] for cid in ok],
            self.run.directions,
        )
        share = self.run.config.optimizer.promote or DEFAULT_PROMOTE
        count = max(1, math.ceil(share * len(state.pending_ids)))
        chosen = sorted(ok[i] for i in state.optimizer.promotion_order(F)[:count])
        # a candidate already scored in full (at the end of a run stopped part-way through this
        # generation, then resumed) keeps that record; the others get the ids their records will have
        promotions = {cid: done[cid] for cid in chosen if cid in done}
        for cid in chosen:
            if cid not in promotions:
                promotions[cid] = state.next_id
                state.next_id += 1
        return dict(sorted(promotions.items()))

    def _promote_front(
        self, state: SearchState, records: dict[int, CandidateRecord], flight: _InFlight, deadline: float
    ) -> str | None:
        """At the end of a multi-fidelity run: screened candidates that, by their screen scores, sit on the
        front of every candidate's best-known scores (or are the optimizer's best there) are scored in
        full, round after round until none is left there, at most a population of them in all; so
        nothing is reported on screen scores alone and no promising candidate is left unreported.
        Returns a stop reason if the time limit cut it short."""
        if not self.run.screening or self.executor.capacity < 1:  # no worker left: nothing can be scored
            return None
        while state.final_promotions < self.run.config.optimizer.population:  # over the run's life, resumes too
            chosen = self._screened_on_front(state, records)[
                : self.run.config.optimizer.population - state.final_promotions
            ]
            if not chosen:
                return None
            state.final_promotions += len(chosen)
            jobs = {cid: state.next_id + i for i, cid in enumerate(chosen)}
            state.next_id += len(jobs)
            self.run_dir.save_state(state)
            for sid, fid in jobs.items():
                while flight.in_flight and len(flight.in_flight) >= self.executor.capacity:
                    outcome = self.executor.next_outcome(timeout=1.0)
                    if outcome is not None:
                        flight.take(outcome)
                if time.monotonic() >= deadline or self.executor.capacity < 1:
                    break
                screen = records[sid]  # its recipe as scored (genes in records are rounded)
                flight.dispatch(
                    fid,
                    np.asarray(screen.genome, dtype=float),
                    "full",
                    sid,
                    dict(screen.recipe or {}),
                    screen.generation,
                )
            while flight.in_flight:
                outcome = self.executor.next_outcome(timeout=1.0)
                if outcome is not None:
                    flight.take(outcome)
            if time.monotonic() >= deadline:
                return "time limit"
        return None

    def _screened_on_front(self, state: SearchState, records: dict[int, CandidateRecord]) -> list[int]:
        """Screened, never promoted candidates on the front of every candidate's best-known scores (full
        where scored in full) or first by the optimizer's ranking there, best first."""
        promoted = {r.promoted_from for r in records.values() if r.promoted_from is not None}
        pool = [r for r in records.values() if r.has_all(self.labels)]
        pool += [
            r
            for r in records.values()
            if r.ok and not r.full and r.id not in promoted and all(k in r.objectives for k in self.labels)
        ]
        if not pool:
            return []
        pool.sort(key=lambda r: r.id)  # ties go by id, not by the order results arrived in
        F = to_minimize([[r.objectives[k] for k in self.labels] for r in pool], self.run.directions)
        order = [int(i) for i in state.optimizer.promotion_order(F)]
        wanted = {int(i) for i in pareto_indices(F)} | {order[0]}
        return [pool[i].id for i in order if i in wanted and not pool[i].full]

    def _steady_loop(
        self,
        state: SearchState,
        records: dict[int, CandidateRecord],
        by_hash: dict[tuple[str, str], CandidateRecord],
        bar: _Progress,
        deadline: float,
    ) -> str:
        """Async mode: ask one candidate per free worker, tell each result as it arrives.

        Every record is told right after it is appended, so evaluations.jsonl is the tell order. A run
        stopped between the two is repaired here: recorded-but-untold candidates are told first, in
        file order; asked-but-unrecorded ones are dispatched again with the same genes."""
        told = set(state.told)
        for record in list(records.values()):  # file order
            if record.id not in told:
                self._tell_one(state, record, save=False)
        self.run_dir.save_state(state)
        again = [(cid, x) for cid, x in sorted(state.asked.items()) if cid not in records]

        def keep(record: CandidateRecord) -> None:
            self._record(records, by_hash, record, bar)
            self._tell_one(state, record)

        flight = _InFlight(self, state, by_hash, keep)
        in_flight, waiting = flight.in_flight, flight.waiting

        while True:
            while len(in_flight) < self.executor.capacity and time.monotonic() < deadline:
                open_ = len(records) + len(in_flight) + sum(map(len, waiting.values()))
                if open_ >= self.budget:
                    break
                if again:
                    cid, x = again.pop(0)
                else:
                    x = np.asarray(state.optimizer.ask_one(), dtype=float)
                    cid = state.next_id
                    state.next_id += 1
                    state.asked[cid] = x
                    self.run_dir.save_state(state)
                flight.dispatch(cid, x)
            if not in_flight:
                return "time limit" if time.monotonic() >= deadline else "budget"
            outcome = self.executor.next_outcome(timeout=1.0)
            if outcome is not None:
                flight.take(outcome)

    # --- helpers ------------------------------------------------------------------------------------
    def _tell_one(self, state: SearchState, record: CandidateRecord, *, save: bool = True) -> None:
        """Async mode: tell one recorded candidate (with the genes it was asked with, at full precision)."""
        x = state.asked.pop(record.id, None)
        if x is None:  # asked before a stop that lost the state (never with a state saved at ask time)
            x = np.asarray(record.genome, dtype=float)
        row = [record.objectives.get(label, math.nan) if record.ok else math.nan for label in self.labels]
        state.optimizer.tell_one(x, to_minimize([row], self.run.directions)[0])
        state.told.append(record.id)
        population = self.run.config.optimizer.population
        generation, state.generation = state.generation, len(state.told) // population
        if save:
            self.run_dir.save_state(state)
        if state.generation > generation and self.on_generation is not None:
            self.on_generation(generation)

    def _tell(self, state: SearchState, records: dict[int, CandidateRecord]) -> None:
        """Tell the pending generation: each candidate's full score where it has one, else its screen
        score, the two kinds kept apart (``screened_below_full``)."""
        rows, full = [], []
        for cid in state.pending_ids:
            promoted = (state.promotions or {}).get(cid)
            record = records[promoted] if promoted is not None and promoted in records else records[cid]
            full.append(record.full)
            if not record.ok:
                rows.append([math.nan] * len(self.labels))
            else:
                rows.append([record.objectives.get(label, math.nan) for label in self.labels])
        F = screened_below_full(to_minimize(rows, self.run.directions), np.asarray(full), self.run.weights)
        state.optimizer.tell(np.asarray(state.pending_X), F)
        generation = state.generation
        state.pending_X = None
        state.pending_ids = []
        state.generation += 1
        self.run_dir.save_state(state)
        summary = state.optimizer.summary()
        if summary is not None:
            summary = {"optimizer": state.optimizer.name, "genes": self.genome.names, **summary}
            summary["choice_id"] = _record_with_genes(records, summary.get("choice"))
            self.run_dir.write_optimizer_summary(summary)
        if self.on_generation is not None:
            self.on_generation(generation)

    def _make_record(self, flying: _Flying, state: SearchState, outcome: Any) -> CandidateRecord:
        result = outcome.result
        return CandidateRecord(
            id=flying.cid,
            generation=state.generation if flying.generation is None else flying.generation,
            status=CandidateStatus(result.status),
            objectives=dict(result.objectives),
            genome=_genes(flying.x),
            recipe_hash=flying.digest,
            recipe=flying.recipe,
            reason=result.reason,
            worker=outcome.worker,
            seconds=round(result.seconds, 4),
            materialize_seconds=round(result.materialize_seconds, 4),
            score_seconds=round(result.score_seconds, 4),
            cached=bool(result.cached),
            attempts=outcome.job.attempt + 1,
            time=time.time(),
            fidelity=flying.fidelity,
            promoted_from=flying.promoted_from,
        )

    def _cached(self, original: CandidateRecord, flying: _Flying, state: SearchState) -> CandidateRecord:
        return original.replace(
            id=flying.cid,
            generation=state.generation if flying.generation is None else flying.generation,
            genome=_genes(flying.x),
            promoted_from=flying.promoted_from,
            cached=True,
            seconds=0.0,
            materialize_seconds=0.0,
            score_seconds=0.0,
            worker="cache",
            time=time.time(),
        )

    def _record(
        self,
        records: dict[int, CandidateRecord],
        by_hash: dict[tuple[str, str], CandidateRecord],
        record: CandidateRecord,
        bar: _Progress,
    ) -> None:
        self.run_dir.append(record)
        records[record.id] = record
        if record.promoted_from is None:
            self._spent += 1
        if record.ok:
            by_hash.setdefault((record.recipe_hash, record.fidelity), record)
            self._best = self._better(self._best, record)
        if self.on_record is not None:
            self.on_record(record)
        if record.promoted_from is None:  # the bar counts the budget's candidates, not promotions
            bar.advance(self._best_text())
        else:
            bar.update(self._best_text())

    def _better(self, best: CandidateRecord | None, record: CandidateRecord) -> CandidateRecord | None:
        """The best so far, kept as records arrive (the report's rule, without rebuilding a report each time)."""
        if not record.has_all(self.labels):
            return best
        if best is None:
            return record
        score = weighted_score([record.objectives[k] for k in self.labels], self.run.directions, self.run.weights)
        top = weighted_score([best.objectives[k] for k in self.labels], self.run.directions, self.run.weights)
        return record if (score, -record.id) > (top, -best.id) else best

    def _best_text(self) -> str:
        if self._best is None:
            return "best: -"
        return "best: " + ", ".join(f"{k}={v:.3f}" for k, v in self._best.objectives.items())

    def report(self, records: dict[int, CandidateRecord]) -> RunReport:
        return RunReport(self.run.to_dict(), list(records.values()))

    def _summary(self, records: dict[int, CandidateRecord], stopped: str, seconds: float) -> RunSummary:
        report = self.report(records)
        return RunSummary(
            promoted=sum(1 for r in records.values() if r.promoted_from is not None),
            evaluated=len(records),
            failed=sum(1 for r in records.values() if not r.ok),
            cached=sum(1 for r in records.values() if r.cached),
            stopped=stopped,
            seconds=seconds,
            best=report.best(),
            front=report.front(),
        )


class _InFlight:
    """The candidates being scored, shared by both loops: a recipe already scored (at the same fidelity)
    is answered from the cache, one being scored waits for its twin, anything else goes to the
    executor; ``keep`` is what the loop does with each finished record (record it; in async mode also
    tell it)."""

    def __init__(
        self,
        search: Search,
        state: SearchState,
        by_hash: dict[tuple[str, str], CandidateRecord],
        keep: Callable[[CandidateRecord], None],
    ):
        from evomerge.runtime.jobs import Job  # the runtime (and torch) only once a search runs

        self.search, self.state, self.by_hash, self.keep, self.job = search, state, by_hash, keep, Job
        self.in_flight: dict[int, _Flying] = {}
        self.waiting: dict[tuple[str, str], list[_Flying]] = {}

    def busy(self, cid: int) -> bool:
        """Being scored, or waiting for its twin."""
        return cid in self.in_flight or any(cid == w.cid for ws in self.waiting.values() for w in ws)

    def proposals(self) -> int:
        """Asked candidates being scored or waiting (promotions to full scoring not counted)."""
        flying = [*self.in_flight.values(), *(w for ws in self.waiting.values() for w in ws)]
        return sum(1 for f in flying if f.promoted_from is None)

    def dispatch(
        self,
        cid: int,
        x: np.ndarray,
        fidelity: str = "full",
        promoted_from: int | None = None,
        recipe: dict[str, Any] | None = None,
        generation: int | None = None,
    ) -> None:
        """Score candidate ``cid`` (genes ``x``; ``recipe``: the recipe they decode to, when known;
        ``generation``: the one it was asked in, when not the current one)."""
        if recipe is None:
            decoded = self.search.genome.decode(x)
            digest, recipe = decoded.content_hash(), decoded.to_dict()
        else:
            from evomerge.runtime.jobs import recipe_hash

            digest = recipe_hash(recipe)
        flying = _Flying(cid, x, digest, recipe, fidelity, promoted_from, generation)
        key = (digest, fidelity)
        if key in self.by_hash:
            self.keep(self.search._cached(self.by_hash[key], flying, self.state))
        elif any((f.digest, f.fidelity) == key for f in self.in_flight.values()):
            self.waiting.setdefault(key, []).append(flying)
        else:
            self._submit(flying)

    def take(self, outcome: Any) -> None:
        flying = self.in_flight.pop(outcome.job.candidate_id)
        record = self.search._make_record(flying, self.state, outcome)
        items = getattr(outcome.result, "items", None)
        if record.ok and items:  # per-item responses first: a recorded candidate always has them
            self.search.run_dir.append_responses(flying.cid, flying.digest, items, flying.fidelity)
        self.keep(record)
        for other in self.waiting.pop((flying.digest, flying.fidelity), []):
            if record.ok:
                self.keep(self.search._cached(record, other, self.state))
            else:  # the original failed: score the duplicate itself
                self._submit(other)

    def _submit(self, flying: _Flying) -> None:
        job = self.job(candidate_id=flying.cid, recipe=flying.recipe, fidelity=flying.fidelity)
        self.search.executor.submit(job)
        self.in_flight[flying.cid] = flying


@dataclass
class _Flying:
    """A candidate handed to the executor (or waiting for its twin): what its record will say."""

    cid: int
    x: np.ndarray
    digest: str
    recipe: dict[str, Any]
    fidelity: str = "full"
    promoted_from: int | None = None
    generation: int | None = None
    """The generation it was asked in; None: the current one."""


def _with_defaults(space: Any) -> Any:
    """A saved search space as it validates today (fields added since have their defaults); as saved if
    it no longer validates (the comparison then refuses the resume)."""
    from evomerge.search.space import SpaceError, load_space

    if not isinstance(space, dict):
        return space
    try:
        return load_space(space).model_dump(mode="json")
    except SpaceError:
        return space


def _objective_with_defaults(objective: Any) -> Any:
    """A saved objective as it validates today (fields added since, such as ``screen``, at their defaults)."""
    from evomerge.eval.tasks import Objective

    try:
        return Objective.model_validate(objective).model_dump(mode="json")
    except ValueError:
        return objective


def _record_with_genes(records: dict[int, CandidateRecord], genes: list[float] | None) -> int | None:
    """The latest successful candidate asked with these genes (a finite optimizer's choice), or None.
    Records keep genes rounded to 8 decimals (``_genes``), hence the tolerance."""
    if genes is None:
        return None
    for cid in sorted(records, reverse=True):
        record = records[cid]
        if record.ok and len(record.genome) == len(genes) and np.allclose(record.genome, genes, atol=1e-7):
            return cid
    return None


def _genes(x: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 8) for v in x)


class _Progress:
    """A rich progress bar (candidates done of budget, best so far, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int, text: str):
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("search", total=total, completed=min(done, total), best=text)

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, best=text)

    def update(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, best=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

"""MLflow tracking for a search: one parent run per search, one child run per scored candidate.

The search calls :meth:`Tracker.on_record` for every record and :meth:`Tracker.on_generation` after
every generation. Both only queue work and return at once; one background thread does all MLflow
calls, in batches:

- child runs for the queued records (one ``create_run``, one ``log_batch``, the recipe YAML and the
  end status per candidate), whenever ``flush_every`` records are waiting and at every generation;
- after every generation (or every ``flush_every`` records when no generation hook ever fires, for
  steady-state optimizers): the parent's step metrics (hypervolume, best value per objective;
  step = generation), ``front.csv``, ``plots/front.png``, ``plots/weights.png``, and the ``pareto``
  tag of the child runs that joined or left the front. The experiment is marked as a model-training
  one and gets a saved view of this search's candidates (``leaderboard.py``): the leaderboard is one
  URL, and ``tags.pareto = 'true'`` narrows it to the front. Plots are redrawn at most
  as often as keeps drawing under 5% of the time (every generation, unless generations are
  seconds apart). At close, the last generation's step is logged too, also when it was cut short
  (budget, time limit, Ctrl-C); a step is never logged twice with the same candidates.

A tracking server that is down never stops the search: every MLflow error is caught and logged as a
warning (once per outage), the records stay queued (up to ``max_queue``; older ones are then dropped
from memory and re-read from ``evaluations.jsonl`` when the server answers again), and
:meth:`Tracker.sync` - run by ``start(resume=True)`` - logs whatever the store is missing. Which
candidates are logged is read back from the store (child runs by their ``candidate_id`` tag), so a
crash at any point neither loses nor duplicates a candidate.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.search.record import CandidateRecord
from evomerge.search.report import RunReport
from evomerge.search.rundir import RUN_CONFIG, RunDir
from evomerge.tracking.leaderboard import SCORE_METRIC, leaderboard_view, mark_model_training, publish_view
from evomerge.tracking.store import (
    RunLink,
    get_or_create_experiment,
    git_commit,
    make_client,
    resolve_tracking_uri,
)
from evomerge.tracking.summary import flatten, gene_summary, mlflow_key, param_value

log = logging.getLogger("evomerge.tracking")

PARENT_TAG = "mlflow.parentRunId"
MAX_TAG_LENGTH = 5000
BATCH_PARAMS = 100
"""MLflow takes at most 100 params (and 100 tags) per log_batch."""
PLOT_SHARE = 0.05
"""The plots are redrawn at every summary unless that would spend more than this share of the time
drawing (fast generations); then as often as that allows, and always at close."""
FRONT_HEATMAP_ROWS = 12
"""The final heatmap shows at most this many front recipes (best first), to stay readable."""
_RESERVED_METRICS = {"generation", "seconds", "materialize_seconds", "score_seconds", "score"}


class Tracker:
    """Logs a search to MLflow without ever blocking or failing it. See the module docstring."""

    def __init__(
        self,
        run_config: Mapping[str, Any],
        run_dir: str | Path,
        *,
        uri: str | None = None,
        experiment: str = "evomerge",
        flush_every: int = 8,
        max_queue: int = 10_000,
        close_timeout: float = 300.0,
        close_stall: float = 30.0,
        best_few: int = 4,
    ):
        self.run_config = dict(run_config)
        self.run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(uri, self.run_dir)
        self.experiment = experiment
        self.flush_every = max(1, int(flush_every))
        self.max_queue = max(1, int(max_queue))
        self.close_timeout = close_timeout
        self.close_stall = close_stall
        self.best_few = best_few
        template = RunReport(self.run_config, [])
        self._scorer = template  # weighted score of a record, by the run's objectives
        self.labels: list[str] = template.labels
        self.directions: list[str] = template.directions
        self.metric_keys = {
            label: (key if key not in _RESERVED_METRICS else f"objective/{key}")
            for label in self.labels
            for key in [mlflow_key(label)]
        }
        self.population = int((self.run_config.get("optimizer") or {}).get("population") or 0)

        # MLflow prints two "View run ... at" lines per child run when the store is a server: thousands
        # of lines in an overnight log. The leaderboard URL (evomerge ui) is the one to open.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.stats: dict[str, float] = {
            "logged": 0,
            "failures": 0,
            "hook_seconds": 0.0,
            "worker_seconds": 0.0,
            "worker_cpu_seconds": 0.0,
        }

        # state shared between the search thread and the worker (guarded by _lock)
        self._lock = threading.Lock()
        self._done_cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._slim: dict[int, CandidateRecord] = {}
        """Every record seen, without genome and recipe: enough for the front and the step metrics."""
        self._pending: dict[int, CandidateRecord] = {}
        """Full records waiting for their child run, oldest first (bounded by max_queue)."""
        self._overflow = False
        self._top: list[tuple[float, int, CandidateRecord]] = []
        """The best few full records (by the weighted score), for the weights heatmap."""
        self._summary_steps: set[int] = set()
        self._artifacts_at = -1
        self._final_count = -1  # candidates in the last final plots (front heatmap, images)
        """How many records the plots showed when last drawn (the plots may lag front.csv; never at close)."""
        """How many records the parent's artifacts showed when last logged."""
        self._plot_seconds = 0.0
        self._plotted_at = -math.inf
        """How long the last drawing took, and when it ended (see PLOT_SHARE)."""
        self._since_summary = 0
        self._generation_hooks = 0
        self._requested = 0
        self._done = 0
        self._closing = False
        self._final_status = "FINISHED"

        # MLflow-side state (touched only while holding _io: the worker, or sync())
        self._io = threading.RLock()
        self._resume = False
        self._parent_ready = False
        self._children: dict[int, str] = {}
        """candidate id -> child run id, for children that are completely logged."""
        self._incomplete: dict[int, str] = {}
        """candidate id -> a child run that was created but not finished (reused, never duplicated)."""
        self._pareto: dict[int, bool] = {}
        self._steps_logged: dict[int, int] = {}
        """Parent steps logged -> how many candidates they counted (a step is re-logged only if that changed)."""
        self._backfill = False
        self._failing = False
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls, run_config: Mapping[str, Any], run_dir: str | Path, *, uri: str | None = None, **kwargs: Any
    ) -> "Tracker":
        """A tracker set up from the run config's ``tracking`` section (``uri`` wins over it)."""
        tracking = run_config.get("tracking") or {}
        return cls(
            run_config,
            run_dir,
            uri=uri or tracking.get("uri"),
            experiment=tracking.get("experiment") or "evomerge",
            **kwargs,
        )

    # --- the search's hooks -------------------------------------------------------------------------
    def start(self, *, resume: bool) -> None:
        """Start the background worker, whose first job is to create the parent run (or, on resume,
        re-attach to the one in RUN_DIR/mlflow.json) - importing MLflow and opening a new store takes
        seconds, which the search does not wait for. On resume, every record of evaluations.jsonl not
        yet in MLflow is queued for it (as :meth:`sync` would log them). Never raises: without a
        reachable store, the worker retries at every flush."""
        began = time.perf_counter()
        self._resume = resume
        if resume:
            try:
                self._remember_all(RunDir(self.run_dir).records(), queue=True)
                self._backfill = True
            except Exception as exc:  # noqa: BLE001
                self._fail("reading evaluations.jsonl", exc)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="evomerge-mlflow", daemon=True)
            self._thread.start()
        self._request()
        self.stats["hook_seconds"] += time.perf_counter() - began

    def on_record(self, record: CandidateRecord) -> None:
        """Queue one candidate's record; returns at once, never raises."""
        began = time.perf_counter()
        try:
            with self._lock:
                self._remember(record, queue=True)
                self._since_summary += 1
                steady = self._generation_hooks == 0 and self._since_summary >= max(
                    self.flush_every, self.population + 1
                )
                if steady:
                    self._summary_steps.add(max(r.generation for r in self._slim.values()))
                    self._since_summary = 0
                wake = steady or len(self._pending) >= self.flush_every
            if wake:
                self._request()
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow tracking: could not queue record %s: %s", getattr(record, "id", "?"), _short(exc))
        self.stats["hook_seconds"] += time.perf_counter() - began

    def on_generation(self, generation: int) -> None:
        """A generation is complete: log its child runs, the parent's step metrics and artifacts
        (in the background; returns at once, never raises)."""
        began = time.perf_counter()
        try:
            with self._lock:
                self._generation_hooks += 1
                self._summary_steps.add(int(generation))
                self._since_summary = 0
            self._request()
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow tracking: generation %s: %s", generation, _short(exc))
        self.stats["hook_seconds"] += time.perf_counter() - began

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far has been handled (logged, or failed and kept queued).
        True if the worker got through in time."""
        if self._thread is None or not self._thread.is_alive():
            return False
        with self._lock:
            self._requested += 1
            target = self._requested
            self._wake.set()
            thread = self._thread
            return self._done_cond.wait_for(
                lambda: self._done >= target or thread is None or not thread.is_alive(), timeout
            )

    def close(self, status: str = "FINISHED") -> None:
        """Final flush, then end the parent run with ``status`` (FINISHED, FAILED or KILLED). Waits while
        the flush makes progress, at most ``close_timeout`` seconds, and gives up after ``close_stall``
        seconds without a candidate logged (a store that does not answer); never raises. Whatever
        could not be logged is in evaluations.jsonl and is synced by the next ``start(resume=True)``."""
        began = time.perf_counter()
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is None:
                return
            with self._lock:
                self._closing = True
                self._final_status = status
                self._requested += 1
            self._wake.set()
            deadline = time.monotonic() + self.close_timeout
            progress, last = self.stats["logged"], time.monotonic()
            while self._thread.is_alive() and time.monotonic() < min(deadline, last + self.close_stall):
                self._thread.join(0.2)
                if self.stats["logged"] != progress:
                    progress, last = self.stats["logged"], time.monotonic()
            if self._thread.is_alive():
                log.warning(
                    "MLflow tracking at %s: gave up waiting for the final flush; %d records are not logged yet "
                    "(they are in %s; resuming the run logs them)",
                    self.uri,
                    len(self._pending),
                    self.run_dir / "evaluations.jsonl",
                )
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow tracking: close: %s", _short(exc))
        finally:
            self.stats["hook_seconds"] += time.perf_counter() - began

    def sync(self) -> int:
        """Log every record of evaluations.jsonl that has no complete child run in MLflow yet (and the
        parent's missing step metrics); returns how many child runs were logged. Runs in the calling
        thread; never raises (an unreachable store logs a warning and returns what got through)."""
        logged = 0
        try:
            with self._io:
                if self.parent_run_id is None:
                    self._resume = True  # syncing is about the run dir's parent run (mlflow.json), if any
                self._ensure_parent()
                self._load_children()
                self._remember_all(RunDir(self.run_dir).records(), queue=True)
                with self._lock:
                    missing = [r for cid, r in self._pending.items() if cid not in self._children]
                    self._overflow = False
                missing += self._reload_dropped({r.id for r in missing})
                front = self._front_ids()
                for record in missing:
                    self._log_child(record, front)
                    logged += 1
                    with self._lock:
                        self._pending.pop(record.id, None)
                self._update_pareto(front)
                self._log_steps(self._complete_generations())
                self._log_artifacts(final=True)
            self._recovered()
        except Exception as exc:  # noqa: BLE001
            self._fail("sync", exc)
        return logged

    # --- the worker ---------------------------------------------------------------------------------
    def _request(self) -> None:
        with self._lock:
            self._requested += 1
        self._wake.set()

    def _work(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                target, closing, status = self._requested, self._closing, self._final_status
            began, cpu = time.perf_counter(), time.thread_time()
            try:
                with self._io:
                    self._flush(final=closing)
                    if closing:
                        self._finish(status)
                self._recovered()
            except Exception as exc:  # noqa: BLE001
                self._fail("logging", exc)
            finally:
                self.stats["worker_seconds"] += time.perf_counter() - began
                self.stats["worker_cpu_seconds"] += time.thread_time() - cpu
                with self._lock:
                    self._done = max(self._done, target)
                    self._done_cond.notify_all()
            if closing:
                return

    def _flush(self, *, final: bool = False) -> None:
        self._ensure_parent()
        with self._lock:
            batch = list(self._pending.values())
            overflow, self._overflow = self._overflow, False
            requested = set(self._summary_steps)
        if overflow:
            batch += self._reload_dropped({r.id for r in batch})
        front = self._front_ids()
        for record in batch:
            if record.id not in self._children:
                self._log_child(record, front)
            with self._lock:
                self._pending.pop(record.id, None)
        summary = bool(requested) or self._backfill or final
        if not (batch or summary):
            return
        self._update_pareto(front)
        if not summary:
            return
        steps = set(requested)
        if self._backfill:
            steps |= self._complete_generations()
        if final:
            steps |= self._last_generation()
        self._log_steps(steps)  # skips steps already logged with the same candidates
        with self._lock:
            self._summary_steps -= requested
            changed = len(self._slim) != self._artifacts_at or (final and len(self._slim) != self._final_count)
        if changed:
            self._log_artifacts(final=final)
        self._backfill = False

    def _finish(self, status: str) -> None:
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status=status)

    # --- the parent run -----------------------------------------------------------------------------
    def _ensure_parent(self) -> None:
        if self._parent_ready:
            return
        if self.client is None:
            self.client = make_client(self.uri)
        if self.experiment_id is None:
            self.experiment_id = get_or_create_experiment(self.client, self.experiment, self.uri)
        existing: dict[str, str] = {}
        if self.parent_run_id is None:
            run = self._previous_parent() if self._resume else None
            if run is not None:
                self.parent_run_id = run.info.run_id
                self.experiment_id = run.info.experiment_id
                existing = dict(run.data.params)
                self.client.update_run(self.parent_run_id, status="RUNNING")
                self._load_children()
                history = self.client.get_metric_history(self.parent_run_id, "candidates")
                self._steps_logged = {m.step: int(m.value) for m in sorted(history, key=lambda m: m.timestamp)}
            else:
                run = self.client.create_run(self.experiment_id, run_name=self._run_name(), tags=self._parent_tags())
                self.parent_run_id = run.info.run_id
            RunLink(self.uri, self.experiment_id, self.parent_run_id).write(self.run_dir)
            self._publish_leaderboard()
        else:
            existing = dict(self.client.get_run(self.parent_run_id).data.params)
        params = {k: v for k, v in self._parent_params().items() if k not in existing}
        self._log_params(self.parent_run_id, params)
        self._log_config_artifacts()
        self._parent_ready = True

    def _publish_leaderboard(self) -> None:
        """The experiment opens on runs, and this search's leaderboard is one URL (see leaderboard.py)."""
        assert self.experiment_id is not None and self.parent_run_id is not None
        mark_model_training(self.client, self.experiment_id)
        keys = [self.metric_keys[label] for label in self.labels]
        view = leaderboard_view(self.parent_run_id, keys, self.directions, params=["method"])
        publish_view(self.client, self.experiment_id, self.parent_run_id, view)

    def _previous_parent(self) -> Any:
        link = RunLink.read(self.run_dir)
        if link is None or link.tracking_uri != self.uri:
            return None
        try:
            run = self.client.get_run(link.parent_run_id)
        except Exception as exc:  # noqa: BLE001 - gone (deleted, another store): start a new parent
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                return None
            raise
        return run if run.info.lifecycle_stage == "active" else None

    def _run_name(self) -> str:
        return str(self.run_config.get("name") or self.run_dir.resolve().name)

    def _parent_tags(self) -> dict[str, str]:
        tags = {
            "evomerge.role": "search",
            "run_dir": str(self.run_dir.resolve()),
            "mlflow.source.name": "evomerge search",
            "mlflow.note.content": self._note(),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return tags

    def _note(self) -> str:
        objectives = ", ".join(f"`{self.metric_keys[label]}` ({d})" for label, d in zip(self.labels, self.directions))
        return (
            f"evomerge search over {objectives}.\n\n"
            "Each child run is one scored candidate: its genes are params, its scores metrics, its recipe "
            "`recipe.yaml`. The leaderboard (`evomerge ui --run-dir RUN_DIR` prints its URL) lists them "
            "sorted by `score` (the weighted score), one column per objective; `tags.pareto = 'true'` in "
            "the search box narrows it to the Pareto front. This run's step metrics follow the search per "
            "generation; `front.csv` is the front, and the front plot and the final front's per-layer weights are "
            "images in the Model metrics tab (and `plots/` in Artifacts, redrawn during the search)."
        )

    def _parent_params(self) -> dict[str, str]:
        import evomerge

        params = flatten(self.run_config)
        seed = (self.run_config.get("optimizer") or {}).get("seed")
        if seed is not None:
            params["seed"] = param_value(seed)
        params["evomerge_version"] = evomerge.__version__
        commit = git_commit()
        if commit:
            params["git_commit"] = commit
        return params

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i : i + BATCH_PARAMS])

    def _log_config_artifacts(self) -> None:
        with tempfile.TemporaryDirectory(prefix="evomerge-mlflow-") as tmp:
            saved = self.run_dir / RUN_CONFIG
            text = saved.read_text() if saved.exists() else yaml.safe_dump(self.run_config, sort_keys=False)
            (Path(tmp) / RUN_CONFIG).write_text(text)
            space = self.run_config.get("search_space")
            if space is not None:
                (Path(tmp) / "search_space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
            self.client.log_artifacts(self.parent_run_id, tmp)

    # --- child runs ---------------------------------------------------------------------------------
    def _load_children(self) -> None:
        """What the store already holds under the parent: complete and incomplete child runs by candidate id."""
        children: dict[int, str] = {}
        incomplete: dict[int, str] = {}
        pareto: dict[int, bool] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                max_results=1000,
                page_token=token,
            )
            for run in page:
                cid = run.data.tags.get("candidate_id")
                if cid is None or not cid.lstrip("-").isdigit():
                    continue
                cid_int = int(cid)
                if run.info.status in ("FINISHED", "FAILED"):
                    children.setdefault(cid_int, run.info.run_id)
                    pareto[cid_int] = run.data.tags.get("pareto") == "true"
                else:
                    incomplete.setdefault(cid_int, run.info.run_id)
            token = page.token
            if not token:
                break
        self._children = children
        self._incomplete = {c: r for c, r in incomplete.items() if c not in children}
        self._pareto = {c: p for c, p in pareto.items() if c in children}
        with self._lock:
            for cid in children:
                self._pending.pop(cid, None)

    def _log_child(self, record: CandidateRecord, front: set[int]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        from evomerge.recipe import candidate_from_dict

        cid = record.id
        ok = record.ok
        ended = record.time or time.time()
        started = ended - record.seconds
        on_front = cid in front
        tags = {
            PARENT_TAG: self.parent_run_id,
            "evomerge.role": "candidate",
            "candidate_id": str(cid),
            "status": record.status.value,
            "pareto": "true" if on_front else "false",
            "recipe_hash": record.recipe_hash,
            "worker": record.worker,
            "fidelity": record.fidelity,
        }
        if record.promoted_from is not None:
            tags["promoted_from"] = str(record.promoted_from)
        if record.reason:
            tags["reason"] = str(record.reason)[:MAX_TAG_LENGTH]
            tags["mlflow.note.content"] = f"failed: {tags['reason']}"
        run_id = self._incomplete.get(cid)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, start_time=int(started * 1000), tags=tags, run_name=f"candidate-{cid}"
            )
            run_id = run.info.run_id
            self._incomplete[cid] = run_id
            tags = {}  # given to create_run; a reused run (begun, never finished) gets them below
        stamp = int(ended * 1000)
        prefix = "" if record.full else f"{record.fidelity}."  # screen scores never share a column with full ones
        metrics = [
            Metric(prefix + self.metric_keys[label], float(value), stamp, 0)
            for label, value in record.objectives.items()
            if label in self.metric_keys and _number(value)
        ]
        if len(self.labels) > 1 and record.has_all(self.labels):
            metrics.append(Metric(SCORE_METRIC, float(self._scorer.score(record)), stamp, 0))
        metrics.append(Metric("generation", float(record.generation), stamp, 0))
        for key in ("seconds", "materialize_seconds", "score_seconds"):
            metrics.append(Metric(key, float(getattr(record, key)), stamp, 0))
        params = self._child_params(record)
        items = [Param(k, v) for k, v in params.items()]
        self.client.log_batch(
            run_id, metrics=metrics, params=items[:BATCH_PARAMS], tags=[RunTag(k, str(v)) for k, v in tags.items()]
        )
        for i in range(BATCH_PARAMS, len(items), BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i : i + BATCH_PARAMS])
        try:
            text = candidate_from_dict(dict(record.recipe or {}), source=f"candidate {cid}").to_yaml()
        except Exception:  # noqa: BLE001 - log what the record holds, even if it no longer validates
            text = yaml.safe_dump(dict(record.recipe or {}), sort_keys=False)
        self.client.log_text(run_id, text, "recipe.yaml")
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED", end_time=stamp)
        self._children[cid] = run_id
        self._incomplete.pop(cid, None)
        self._pareto[cid] = on_front
        self.stats["logged"] += 1

    def _child_params(self, record: CandidateRecord) -> dict[str, str]:
        try:
            params = gene_summary(dict(record.recipe or {}))
        except Exception:  # noqa: BLE001
            params = {"method": param_value(record.method or None)}
        values = {
            "candidate_id": record.id,
            "recipe_hash": record.recipe_hash,
            "worker": record.worker,
            "cached": record.cached,
            "attempts": record.attempts,
        }
        params.update({key: param_value(value) for key, value in values.items()})
        return params

    def _update_pareto(self, front: set[int]) -> None:
        for cid, run_id in self._children.items():
            want = cid in front
            if self._pareto.get(cid) != want:
                self.client.set_tag(run_id, "pareto", "true" if want else "false")
                self._pareto[cid] = want

    # --- the parent's summary -----------------------------------------------------------------------
    def _report(self, max_generation: int | None = None) -> RunReport:
        with self._lock:
            rows = [r for r in self._slim.values() if max_generation is None or r.generation <= max_generation]
        return RunReport(self.run_config, sorted(rows, key=lambda r: r.id))

    def _front_ids(self) -> set[int]:
        return {r.id for r in self._report().front()}

    def _complete_generations(self) -> set[int]:
        """Generations followed by a later one (so complete), whose step metrics are not logged yet."""
        with self._lock:
            generations = {r.generation for r in self._slim.values()}
        if not generations:
            return set()
        last = max(generations)
        return {g for g in generations if g < last and g not in self._steps_logged}

    def _last_generation(self) -> set[int]:
        """At close: the latest generation, also when it was cut short (budget, time limit, Ctrl-C) and
        never completed - else its candidates would be missing from the final step metrics."""
        with self._lock:
            generations = {r.generation for r in self._slim.values()}
        return {max(generations)} if generations else set()

    def _log_steps(self, steps: Iterable[int]) -> None:
        from mlflow.entities import Metric

        metrics = []
        stamp = int(time.time() * 1000)
        counts = {}
        for step in sorted(steps):
            report = self._report(step)
            if self._steps_logged.get(step) == report.count:
                continue  # already logged with these candidates (e.g. before a resume)
            counts[step] = report.count
            values = {
                "hypervolume": report.hypervolume(),
                "candidates": report.count,
                "failed": sum(1 for r in report.records if not r.ok),
                "front_size": len(report.front()),
            }
            for label, direction in zip(self.labels, self.directions):
                seen = [r.objectives[label] for r in report.ok]
                if seen:
                    values[f"best/{self.metric_keys[label]}"] = max(seen) if direction == "maximize" else min(seen)
            metrics += [Metric(k, float(v), stamp, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.parent_run_id, metrics=metrics[i : i + 1000])
        self._steps_logged.update(counts)

    def _log_artifacts(self, *, final: bool = False) -> None:
        """front.csv, and (see PLOT_SHARE) plots/front.png and plots/weights.png."""
        from evomerge.tracking.plots import plot_front, plot_weights

        report = self._report()
        front = report.front()
        counted = report.count
        with tempfile.TemporaryDirectory(prefix="evomerge-mlflow-") as tmp:
            root = Path(tmp)
            with open(root / "front.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "generation", *self.labels, "score", "method", "recipe_hash", "run_id"])
                for row in front:
                    writer.writerow(
                        [
                            row.id,
                            row.generation,
                            *[row.objectives[k] for k in self.labels],
                            f"{report.score(row):.6g}",
                            row.method,
                            row.recipe_hash,
                            self._children.get(row.id, ""),
                        ]
                    )
            ok = report.ok
            drawn = time.monotonic()
            if ok and (final or (drawn - self._plotted_at) * PLOT_SHARE >= self._plot_seconds):
                index = {r.id: i for i, r in enumerate(ok)}
                plot_front(
                    root / "plots" / "front.png",
                    report.values(ok),
                    [index[r.id] for r in front],
                    self.labels,
                    self.directions,
                    ids=[r.id for r in ok],
                    generations=[r.generation for r in ok],
                )
                if final:  # the final front's recipes, best first (read back: only the best few are in memory)
                    members = {r.id: report.score(r) for r in front}
                    full = [r for r in RunDir(self.run_dir).records() if r.id in members]
                    best = sorted(full, key=lambda r: (-members[r.id], r.id))[:FRONT_HEATMAP_ROWS]
                    title = f"per-layer weight of the final front ({len(front)} recipes)"
                else:
                    with self._lock:
                        best = [record for _, _, record in sorted(self._top, key=lambda t: (-t[0], -t[1]))]
                    title = None
                if best:
                    plot_weights(root / "plots" / "weights.png", best, title=title)
                self._plotted_at = time.monotonic()
                self._plot_seconds = self._plotted_at - drawn
            if final:
                self._write_optimizer_summary(root)
            self.client.log_artifacts(self.parent_run_id, tmp)
            if final:
                self._log_images(root / "plots")
                self._final_count = counted
        self._artifacts_at = counted

    def _write_optimizer_summary(self, root: Path) -> None:
        """A finite optimizer's findings (sweep fit and pick, soup steps) as optimizer.json and plots/optimizer.png."""
        from evomerge.tracking.plots import plot_optimizer_summary

        summary = RunDir(self.run_dir).read_optimizer_summary()
        if summary is None:
            return
        (root / "optimizer.json").write_text(json.dumps(summary, indent=2))
        plot_optimizer_summary(root / "plots" / "optimizer.png", summary)

    def _log_images(self, plots: Path) -> None:
        """The final plots as MLflow images too: the run page's "Model metrics" tab shows them (artifacts
        under plots/ are only listed in its "Artifacts" tab)."""
        from PIL import Image

        for name in ("front", "weights", "optimizer"):
            path = plots / f"{name}.png"
            if path.exists():
                with Image.open(path) as image:
                    self.client.log_image(self.parent_run_id, image.convert("RGB"), key=name, step=0)

    # --- in-memory bookkeeping ----------------------------------------------------------------------
    def _remember_all(self, records: Iterable[CandidateRecord], *, queue: bool) -> None:
        with self._lock:
            for record in records:
                self._remember(record, queue=queue and record.id not in self._children)

    def _remember(self, record: CandidateRecord, *, queue: bool) -> None:
        """(Caller holds _lock.) Keep the slim record, the full one while it waits, and the best few."""
        cid = record.id
        self._slim[cid] = record.slim()
        if queue and cid not in self._pending:
            self._pending[cid] = record
            while len(self._pending) > self.max_queue:
                self._pending.pop(next(iter(self._pending)))
                self._overflow = True
        if record.has_all(self.labels) and self.best_few > 0:
            score = self._scorer.score(record)
            self._top = [t for t in self._top if t[1] != -cid]
            self._top.append((score, -cid, record))
            self._top.sort(key=lambda t: (t[0], t[1]), reverse=True)
            del self._top[self.best_few :]

    def _reload_dropped(self, have: set[int]) -> list[CandidateRecord]:
        """Full records dropped from the bounded queue (or never queued): re-read from evaluations.jsonl."""
        with self._lock:
            wanted = {cid for cid in self._slim if cid not in self._children and cid not in have}
        if not wanted:
            return []
        return [r for r in RunDir(self.run_dir).records() if r.id in wanted]

    # --- failures -----------------------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> None:
        self.stats["failures"] += 1
        if not self._failing:
            self._failing = True
            log.warning(
                "MLflow tracking at %s: %s failed (%s); the search goes on, %d records wait and are retried "
                "at the next flush (every record is also in %s; resuming the run syncs them)",
                self.uri,
                what,
                _short(exc),
                len(self._pending),
                self.run_dir / "evaluations.jsonl",
            )
        else:
            log.debug("MLflow tracking: %s failed again: %s", what, _short(exc))

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("MLflow tracking at %s works again; queued records are logged", self.uri)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"

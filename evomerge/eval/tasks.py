"""Objectives and their lm-eval tasks, loaded once per worker.

An objective names an lm-eval task (built-in, or under an include path such as the zoo's ``tasks/``),
the metric, the split (``search`` items for fitness, ``test`` held out), an optional item limit or
seeded fixed subset, a direction and a weight. Tasks are parsed and their requests built exactly once;
every candidate afterwards only runs forward passes (see ``scorer.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class TaskError(ValueError):
    """An objective whose task, split or metric cannot be used; the message says what is valid."""


class Objective(BaseModel):
    """One thing a candidate is scored on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    metric: str | None = None
    """Default: the task's first metric."""
    split: str = "search"
    limit: int | None = Field(default=None, gt=0)
    subset_seed: int | None = None
    """With ``limit``: a seeded random subset of that many items instead of the first ``limit``."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: the task's own ``higher_is_better`` for the metric."""
    weight: float = 1.0
    reference: float | None = None
    """Hypervolume reference value (default: 0 for maximized metrics, the worst seen for minimized)."""
    name: str | None = None
    """Label in tables and logs; default ``task/metric``."""
    screen: int | None = Field(default=None, gt=0)
    """Multi-fidelity search (off by default): every candidate is scored first on this many of the
    objective's items (a fixed seeded subset, the same for the whole run), and only the best share of
    each generation (``optimizer.promote``) on all of them. A value from the subset is never told,
    reported or exported as if it were a full score."""

    @property
    def label(self) -> str:
        return self.name or f"{self.task}/{self.metric}"


@dataclass
class PreparedTask:
    """One (task, split, item selection), with its lm-eval requests built once."""

    name: str
    split: str
    task: Any  # lm_eval.api.task.Task, configured for ``split``
    doc_ids: list[int]
    higher_is_better: dict[str, bool]
    instances_by_doc: list[list[Any]] = field(default_factory=list)
    objective_labels: list[str] = field(default_factory=list)
    """The objectives this selection serves."""
    manager: Any = None
    """The TaskManager it was loaded with (lm-eval's evaluator reuses it instead of indexing again)."""

    @property
    def key(self) -> tuple[str, str, tuple[int, ...]]:
        return (self.name, self.split, tuple(self.doc_ids))

    @property
    def metrics(self) -> list[str]:
        return list(self.task.aggregation())

    @property
    def output_type(self) -> str:
        return self.task.OUTPUT_TYPE


def make_task_manager(names: Sequence[str], include_paths: Sequence[str | Path]) -> Any:
    """A TaskManager over the include paths; built-in tasks are indexed (slow, ~8 s) only when named."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_paths]
    for p in paths:
        if not Path(p).is_dir():
            raise TaskError(f"include path {p}: not a directory")
    manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    known = set(manager.all_tasks) if manager is not None else set()
    if all(name in known for name in names):
        return manager
    log.info("indexing lm-eval's built-in tasks for %s", [n for n in names if n not in known])
    manager = TaskManager(include_path=paths or None, include_defaults=True)
    missing = [n for n in names if n not in set(manager.all_tasks)]
    if missing:
        where = f" or under {', '.join(paths)}" if paths else ""
        raise TaskError(f"unknown task(s) {', '.join(missing)}: not an lm-eval built-in task{where}")
    return manager


def _quietly(function: Any, *args: Any) -> Any:
    """Call ``function`` without the datasets library's progress bars (loading a small local task
    prints a bar per split; when only the task's declarations are read, that is noise)."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return function(*args)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def objective_directions(objectives: Sequence[Objective], include_paths: Sequence[str | Path] = ()) -> list[str]:
    """Each objective's direction: as given, else what its task declares for the metric.

    lm-eval tasks say per metric whether higher is better (``metric_list[].higher_is_better``, or the
    metric's registered default); that is the only source of truth, so a lower-is-better metric is
    never maximized because its name is not on some list. Loads each task once (no requests built),
    and refuses an objective whose task lacks its split or metric, before any worker starts.
    """
    if all(o.direction for o in objectives):
        return [str(o.direction) for o in objectives]
    manager = make_task_manager(list(dict.fromkeys(o.task for o in objectives if not o.direction)), include_paths)
    declared: dict[str, dict[str, bool]] = {}
    splits: dict[str, list[str]] = {}
    directions: list[str] = []
    for objective in objectives:
        if objective.direction:
            directions.append(objective.direction)
            continue
        if objective.task not in declared:
            tasks = _quietly(manager.load, [objective.task])["tasks"]
            if len(tasks) != 1:
                raise TaskError(f"{objective.task}: is a group of {len(tasks)} tasks; name its tasks one by one")
            task = next(iter(tasks.values()))
            declared[objective.task] = dict(task.higher_is_better())
            splits[objective.task] = list(task.dataset.keys()) if getattr(task, "dataset", None) is not None else []
        if objective.split not in splits[objective.task]:
            raise TaskError(
                f"{objective.label}: task {objective.task} has no split {objective.split!r} "
                f"(valid: {', '.join(splits[objective.task]) or 'none'})"
            )
        higher = declared[objective.task]
        metric = objective.metric or next(iter(higher), None)
        if metric is not None and "," in metric and metric.split(",")[0] in higher:
            metric = metric.split(",")[0]  # metric,filter (a task with named filters): the metric's direction
        if metric not in higher:
            raise TaskError(
                f"{objective.label}: task {objective.task} has no metric {metric!r} (valid: {', '.join(higher)})"
            )
        if higher[metric] is None:
            valid = ", ".join(k for k, v in higher.items() if v is not None) or "none"
            raise TaskError(
                f"{objective.label}: task {objective.task} declares no direction for metric {metric!r} "
                f"(metrics with one: {valid}); set the objective's direction: maximize or minimize"
            )
        directions.append("maximize" if higher[metric] else "minimize")
    return directions


def prepare_tasks(
    objectives: Sequence[Objective], include_paths: Sequence[str | Path] = ()
) -> tuple[list[PreparedTask], list[Objective]]:
    """Load each distinct (task, split, selection) once and build its requests.

    Returns the prepared selections and the objectives with their metric resolved.
    """
    manager = make_task_manager(list(dict.fromkeys(o.task for o in objectives)), include_paths)
    prepared: dict[tuple, PreparedTask] = {}
    loaded: dict[str, Any] = {}
    resolved: list[Objective] = []
    for objective in objectives:
        if objective.task not in loaded:
            tasks = _quietly(manager.load, [objective.task])["tasks"]
            if len(tasks) != 1:
                raise TaskError(f"{objective.task}: is a group of {len(tasks)} tasks; name its tasks one by one")
            loaded[objective.task] = next(iter(tasks.values()))
        task = _for_split(loaded[objective.task], objective)
        doc_ids = _select(task, objective)
        item = PreparedTask(
            objective.task, objective.split, task, doc_ids, dict(task.higher_is_better()), manager=manager
        )
        if objective.metric is None:
            objective = objective.model_copy(update={"metric": metric_names(item.task)[0]})
        resolved.append(objective)
        if objective.metric not in metric_names(item.task):
            raise TaskError(
                f"{objective.label}: task {objective.task} has no metric {objective.metric!r} "
                f"(valid: {', '.join(metric_names(item.task))})"
            )
        if item.key not in prepared:
            _build_requests(item)
            prepared[item.key] = item
        prepared[item.key].objective_labels.append(objective.label)
    labels = [o.label for o in resolved]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise TaskError(f"objectives: duplicate label(s) {', '.join(duplicates)}; give each a distinct name")
    return list(prepared.values()), resolved


def metric_names(task: Any) -> list[str]:
    """The names a task's scores go by: each metric, or ``metric,filter`` for each of its named filters
    (lm-eval's naming: a task with a ``filter_list`` scores every metric once per filter, e.g.
    ``exact_match,strict-match``); a task without one (its filter is ``none``) by the metric alone."""
    filters = [str(getattr(f, "name", "none")) for f in getattr(task, "_filters", [])] or ["none"]
    metrics = list(task.aggregation())
    return [m if f == "none" else f"{m},{f}" for f in filters for m in metrics]


def _for_split(task: Any, objective: Objective) -> Any:
    available = list(task.dataset.keys()) if getattr(task, "dataset", None) is not None else []
    if objective.split not in available:
        raise TaskError(
            f"{objective.label}: task {objective.task} has no split {objective.split!r} "
            f"(valid: {', '.join(available) or 'none'})"
        )
    if task.config.test_split == objective.split:
        return task
    # one task object per split: a shallow copy sharing the loaded dataset, with its own config
    clone = copy.copy(task)
    clone._config = copy.copy(task.config)
    clone._config.test_split = objective.split
    clone._instances = None
    return clone


def _select(task: Any, objective: Objective) -> list[int]:
    total = len(task.eval_docs)
    if objective.limit is None or objective.limit >= total:
        return list(range(total))
    if objective.subset_seed is None:
        return list(range(objective.limit))
    return sorted(random.Random(objective.subset_seed).sample(range(total), objective.limit))


SCREEN_SEED = 0
"""The seed of every screened subset: fixed, so a run (and a resumed run, and every worker) screens
every candidate on the same items."""


def screened(item: PreparedTask, size: int) -> PreparedTask:
    """``size`` of a selection's items (a fixed seeded draw, kept in the selection's order), sharing its
    task and built requests: what a candidate is first scored on when its objective has a ``screen``."""
    if size >= len(item.doc_ids):
        return item
    keep = sorted(random.Random(SCREEN_SEED).sample(range(len(item.doc_ids)), size))
    return dataclasses.replace(
        item,
        doc_ids=[item.doc_ids[i] for i in keep],
        instances_by_doc=[item.instances_by_doc[i] for i in keep],
        objective_labels=list(item.objective_labels),
    )


def _build_requests(item: PreparedTask) -> None:
    """lm-eval's own request construction (prompts, few-shot, targets), grouped by document."""
    task = item.task
    task.build_all_requests(samples=item.doc_ids, rank=0, world_size=1)
    by_doc: dict[int, list[Any]] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    item.instances_by_doc = [sorted(by_doc[i], key=lambda x: x.idx) for i in sorted(by_doc)]

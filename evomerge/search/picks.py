"""Picking candidates from a run: the knee of the front, the best on one objective, or an id.

Picks: ``knee`` (the front member closest to the ideal point once each objective is scaled to [0,1]
over the front; the best one for a single objective), ``best`` (best by the score the optimizer
ranked candidates by: the weighted sum, or for ``scalarize: worst`` the weakest weighted objective),
``best:OBJECTIVE`` (best on one objective label), ``optimizer`` (a finite optimizer's choice: the greedy
soup it ends with, a sweep's pick), ``auto`` (``optimizer`` where the run has one; ``best`` for a
scalarizing CMA-ES run, which searched for exactly that; else ``knee``), or a candidate id. Export,
stages and the CLI all pick through here.
"""

from __future__ import annotations

import numpy as np

from evomerge.recipe import MoEConfig, Recipe, candidate_from_dict
from evomerge.search.front import to_minimize
from evomerge.search.optimizers import scalarized
from evomerge.search.record import CandidateRecord
from evomerge.search.report import RunReport


class PickError(ValueError):
    """A pick that names nothing in the run; the message lists what is valid."""


def knee(report: RunReport) -> CandidateRecord:
    front = report.front()
    if not front:
        raise PickError("the run has no successful candidate yet")
    if len(front) == 1:
        return front[0]
    F = to_minimize(report.values(front), report.directions)
    low, high = F.min(axis=0), F.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    distance = np.linalg.norm((F - low) / span, axis=1)
    return front[int(np.argmin(distance))]


def _scalarization(report: RunReport) -> str:
    return str((report.config.get("optimizer") or {}).get("scalarize") or "weighted_sum")


def best_scalarized(report: RunReport) -> CandidateRecord:
    """The candidate the optimizer's own scalarization ranks first (ties: the earliest)."""
    ok = report.ok
    if not ok:
        raise PickError("the run has no successful candidate yet")
    F = to_minimize(report.values(ok), report.directions)
    values = scalarized(F, np.asarray(report.weights, dtype=float), _scalarization(report))
    return ok[int(np.argmin(values))]  # argmin returns the first of equal values: the earliest id


def pick(report: RunReport, choice: str) -> CandidateRecord:
    """The record a ``--pick`` value names."""
    summary = report.optimizer_summary
    if choice == "auto":
        if summary is not None and summary.get("choice_id") is not None:
            choice = "optimizer"
        elif (report.config.get("optimizer") or {}).get("name") == "cma":
            choice = "best"
        else:
            choice = "knee"
    if choice == "best":
        return best_scalarized(report)
    if choice == "optimizer":
        if summary is None:
            raise PickError(
                "--pick optimizer: this run's optimizer makes no choice of its own (only sweep, soups and gradient do)"
            )
        if summary.get("choice_id") is None:
            raise PickError(f"--pick optimizer: the {summary.get('optimizer')} has not finished (or its choice failed)")
        choice = str(summary["choice_id"])
    if choice == "knee":
        return knee(report)
    if choice.startswith("best:"):
        label = choice.removeprefix("best:")
        if label not in report.labels:
            raise PickError(f"--pick {choice}: no objective {label!r} (objectives: {', '.join(report.labels)})")
        ok = report.ok
        if not ok:
            raise PickError("the run has no successful candidate yet")
        sign = 1.0 if report.directions[report.labels.index(label)] == "maximize" else -1.0
        return max(ok, key=lambda r: (sign * r.objectives[label], -r.id))
    try:
        wanted = int(choice)
    except ValueError:
        raise PickError(
            f"--pick {choice!r}: use knee, best, best:OBJECTIVE, optimizer, auto or a candidate id"
        ) from None
    for record in report.records:
        if record.id == wanted:
            if not record.ok:
                raise PickError(f"candidate {wanted} failed ({record.reason}); pick another")
            return record
    raise PickError(f"--pick {wanted}: no such candidate (ids 0..{report.count - 1})")


def recipe_of(record: CandidateRecord) -> Recipe:
    """The record's merge recipe (a mixture of experts is refused: it is no merge)."""
    candidate = candidate_of(record)
    if isinstance(candidate, MoEConfig):
        raise PickError(f"candidate {record.id} is a mixture of experts (a mergekit-moe config), not a merge recipe")
    return candidate


def candidate_of(record: CandidateRecord) -> Recipe | MoEConfig:
    """The record's candidate: a merge recipe or a mixture-of-experts config."""
    if record.recipe is None:
        raise PickError(f"candidate {record.id}: the record holds no recipe")
    return candidate_from_dict(dict(record.recipe), source=f"candidate {record.id}")

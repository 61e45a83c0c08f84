"""Pick candidates from a run and export their recipes as mergekit-compatible YAML.

Picks: ``knee`` (the front member closest to the ideal point once each objective is scaled to [0,1]
over the front; the best one for a single objective), ``best:OBJECTIVE`` (best on one objective label),
or a candidate id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.recipe import Recipe
from evomerge.search.front import to_minimize
from evomerge.search.report import RunReport


class ExportError(ValueError):
    """A pick that names nothing in the run; the message lists what is valid."""


def knee(report: RunReport) -> dict[str, Any]:
    front = report.front()
    if not front:
        raise ExportError("the run has no successful candidate yet")
    if len(front) == 1:
        return front[0]
    F = to_minimize(report.values(front), report.directions)
    low, high = F.min(axis=0), F.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    distance = np.linalg.norm((F - low) / span, axis=1)
    return front[int(np.argmin(distance))]


def pick(report: RunReport, choice: str) -> dict[str, Any]:
    """The record a ``--pick`` value names."""
    if choice == "knee":
        return knee(report)
    if choice.startswith("best:"):
        label = choice.removeprefix("best:")
        if label not in report.labels:
            raise ExportError(f"--pick {choice}: no objective {label!r} (objectives: {', '.join(report.labels)})")
        ok = report.ok
        if not ok:
            raise ExportError("the run has no successful candidate yet")
        sign = 1.0 if report.directions[report.labels.index(label)] == "maximize" else -1.0
        return max(ok, key=lambda r: (sign * r["objectives"][label], -r["id"]))
    try:
        wanted = int(choice)
    except ValueError:
        raise ExportError(f"--pick {choice!r}: use knee, best:OBJECTIVE or a candidate id") from None
    for record in report.records:
        if record["id"] == wanted:
            if record["status"] != "ok":
                raise ExportError(f"candidate {wanted} failed ({record.get('reason')}); pick another")
            return record
    raise ExportError(f"--pick {wanted}: no such candidate (ids 0..{report.count - 1})")


def recipe_of(record: dict[str, Any]) -> Recipe:
    return Recipe.from_dict(record["recipe"], source=f"candidate {record['id']}")


def export_yaml(record: dict[str, Any]) -> str:
    """The candidate's recipe as YAML; with earlier stages (PS+DFS) as a multi-document chain."""
    from evomerge.recipe import chain_to_yaml
    from evomerge.search.stages import chain_of

    return chain_to_yaml(chain_of(recipe_of(record)))


def export_front(report: RunReport, out_dir: Path) -> list[Path]:
    """One YAML per front member plus ``index.json`` (ids, objectives, files), written atomically."""
    from evomerge.atomic import staging_dir

    front = report.front()
    if not front:
        raise ExportError("the run has no successful candidate yet")
    knee_id = knee(report)["id"]
    index = []
    with staging_dir(out_dir) as tmp:
        for record in front:
            name = f"candidate-{record['id']:05d}.yaml"
            (tmp / name).write_text(export_yaml(record))
            index.append({"id": record["id"], "file": name, "objectives": record["objectives"],
                          "recipe_hash": record["recipe_hash"], "knee": record["id"] == knee_id})
        (tmp / "index.json").write_text(json.dumps({"objectives": report.labels, "directions": report.directions,
                                                    "front": index}, indent=2))
    return [Path(out_dir) / item["file"] for item in index]

"""Export picked candidates' recipes as YAML that ``evomerge merge`` and mergekit's ``mergekit-yaml`` run.

A candidate that reads an earlier stage's checkpoint (PS+DFS) is exported as the whole chain: the
stage as a named document, then the recipe naming it (``mergekit-multi``'s form). Picks: ``picks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.atomic import staging_dir
from evomerge.recipe import chain_to_yaml
from evomerge.search.picks import PickError, knee, recipe_of
from evomerge.search.record import CandidateRecord
from evomerge.search.report import RunReport
from evomerge.search.stages import chain_of


def export_yaml(record: CandidateRecord) -> str:
    """The candidate's recipe as YAML; with earlier stages (PS+DFS) as a multi-document chain."""
    return chain_to_yaml(chain_of(recipe_of(record)))


def export_front(report: RunReport, out_dir: str | Path) -> list[Path]:
    """One YAML per front member plus ``index.json`` (ids, objectives, files), written atomically."""
    front = report.front()
    if not front:
        raise PickError("the run has no successful candidate yet")
    knee_id = knee(report).id
    index: list[dict[str, Any]] = []
    with staging_dir(out_dir) as tmp:
        for record in front:
            name = f"candidate-{record.id:05d}.yaml"
            (tmp / name).write_text(export_yaml(record))
            index.append(
                {
                    "id": record.id,
                    "file": name,
                    "objectives": dict(record.objectives),
                    "recipe_hash": record.recipe_hash,
                    "knee": record.id == knee_id,
                }
            )
        (tmp / "index.json").write_text(
            json.dumps({"objectives": report.labels, "directions": report.directions, "front": index}, indent=2)
        )
    return [Path(out_dir) / item["file"] for item in index]

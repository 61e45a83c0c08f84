"""Export picked candidates' recipes as YAML that ``evomerge merge`` and mergekit's ``mergekit-yaml`` run
(``evomerge merge`` only, for the data-aware methods fisher and regmean: the file says so).

A candidate that reads an earlier stage's checkpoint (PS+DFS) is exported as the whole chain: the
stage as a named document, then the recipe naming it (``mergekit-multi``'s form). Picks: ``picks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.atomic import staging_dir
from evomerge.recipe import MERGEKIT_METHODS, MoEConfig, Recipe, chain_to_yaml
from evomerge.search.picks import PickError, candidate_of, knee, recipe_of
from evomerge.search.record import CandidateRecord
from evomerge.search.report import RunReport
from evomerge.search.stages import STAGE_MARKER, chain_of

MOE_NOTE = (
    "# A mixture of experts (mergekit-moe's config): `evomerge moe THIS.yaml OUT_DIR` or\n"
    "# `mergekit-moe THIS.yaml OUT_DIR` assembles it.\n"
)


def export_yaml(record: CandidateRecord) -> str:
    """The candidate's recipe as YAML; with earlier stages (PS+DFS) as a multi-document chain. A recipe
    of a data-aware method (fisher, regmean) starts with a comment saying mergekit cannot run it; a
    mixture of experts is its mergekit-moe config, with a comment saying how to assemble it."""
    candidate = candidate_of(record)
    if isinstance(candidate, MoEConfig):
        return MOE_NOTE + _stage_note(candidate.base_model) + candidate.to_yaml()
    chain = chain_of(recipe_of(record))
    return "".join(evomerge_only_note(r.merge_method) for r in chain[-1:]) + chain_to_yaml(chain)


def _stage_note(base_model: str) -> str:
    """For a mixture on a merged base (a stage): which merge that checkpoint is, as comment lines, so the
    base can be rebuilt (``evomerge merge``) where the stage cache is not."""
    marker = Path(base_model) / STAGE_MARKER
    if not marker.is_file():
        return ""
    info = json.loads(marker.read_text())
    recipe = Recipe.from_dict(info["recipe"]).to_yaml()
    lines = [f"# base_model is the stage {info['name']!r}, merged by this recipe (`evomerge merge` rebuilds it):"]
    return "\n".join([*lines, *(f"#   {line}" for line in recipe.splitlines())]) + "\n"


def evomerge_only_note(method: str) -> str:
    """A YAML comment for a method mergekit does not have ('' for the others)."""
    if method in MERGEKIT_METHODS:
        return ""
    return (
        f"# merge_method {method} is evomerge's own data-aware method: mergekit has no equivalent, so\n"
        "# mergekit-yaml cannot run this recipe. `evomerge merge THIS.yaml OUT_DIR` materializes it (computing\n"
        "# each model's statistics from the data: items first), or `evomerge export --checkpoint OUT_DIR`.\n"
    )


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

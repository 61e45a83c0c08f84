"""Multi-stage searches (PS+DFS): an earlier stage's recipe used as a model by a later search.

A stage is fixed while the later search runs, so it is merged to disk once, into a cache keyed by its
recipe hash, and the later search's recipes name that checkpoint like any other model. Resolving a
config only computes where that checkpoint will be (``stage_checkpoint``); the search merges it
(``materialize_stage``) as its first step, so loading or validating a config writes nothing. On export the
chain is put back together: the stage as a named document, the later recipe naming it, as a
multi-document YAML that ``evomerge merge`` and ``mergekit-multi`` run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.recipe import Recipe, is_moe, substitute_models
from evomerge.search.picks import PickError, pick, recipe_of
from evomerge.search.report import RunReport

STAGE_MARKER = "evomerge_stage.json"


class StageError(ValueError):
    """A stage that cannot be resolved; the message names it."""


def stage_cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "stages"


def stage_recipe(name: str, source: Mapping[str, Any], base_dir: Path) -> Recipe:
    """``{run: RUN_DIR, pick: knee|best:OBJ|ID}`` or ``{recipe: FILE}`` -> the stage's recipe (reads only)."""

    if set(source) - {"run", "pick", "recipe"} or ("run" in source) == ("recipe" in source):
        raise StageError(f"stages.{name}: give either run: RUN_DIR (with an optional pick:) or recipe: FILE")
    if "recipe" in source:
        return Recipe.load(base_dir / str(source["recipe"]))
    run_dir = (base_dir / str(source["run"])).resolve()
    try:
        record = pick(RunReport.load(run_dir), str(source.get("pick", "knee")))
    except (FileNotFoundError, PickError) as exc:
        raise StageError(f"stages.{name}: {exc} (run the earlier stage's search first)") from None
    if is_moe(record.recipe or {}):
        raise StageError(f"stages.{name}: {run_dir} is a mixture-of-experts search; a stage must be a dense merge")
    return recipe_of(record)


def stage_checkpoint(name: str, recipe: Recipe) -> Path:
    """Where the stage's checkpoint lives in the stage cache (whether or not it is merged yet)."""
    return stage_cache_dir() / f"{name}-{recipe.content_hash()}"


def materialize_stage(name: str, recipe: Recipe) -> Path:
    """The stage's checkpoint, merged once into the stage cache."""
    from evomerge.merge.engine import merge_to_disk  # torch: only when a stage is merged

    target = stage_checkpoint(name, recipe)
    if not (target / STAGE_MARKER).exists():
        merge_to_disk(recipe, target, overwrite=True)
        (target / STAGE_MARKER).write_text(json.dumps({"name": name, "recipe": recipe.to_dict()}))
    return target


def chain_of(recipe: Recipe) -> list[Recipe]:
    """The recipe with every stage checkpoint it reads put back as a named stage before it."""
    stages: list[Recipe] = []
    mapping: dict[str, str] = {}
    for ref in recipe.referenced_models():
        marker = Path(ref) / STAGE_MARKER
        if marker.exists():
            info = json.loads(marker.read_text())
            inner = chain_of(Recipe.from_dict(info["recipe"]))
            stages.extend(inner[:-1])
            stages.append(inner[-1].model_copy(update={"name": info["name"]}))
            mapping[ref] = info["name"]
    return [*stages, substitute_models(recipe, mapping)] if stages else [recipe]

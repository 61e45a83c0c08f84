"""Side by side on the zoo's held-out items: base, specialists, hand-set merges and any recipe.

This is the table a newcomer reads to see whether a searched merge beats the merges one would set by
hand (``evomerge zoo compare``, the end of ``scripts/demo.sh``, ``scripts/bench_search.py``). Scores
are lm-eval ``acc`` on the ``test`` split through evomerge's evaluator; the **gain retention** of a
merge on a skill is (merge - base) / (specialist - base).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.zoo.quality import HAND_SET_MERGES, gain_retention, hand_set_recipes


@dataclass
class Comparison:
    """Test accuracies per row and task, with each specialist's and the base's as the reference."""

    tasks: dict[str, str]
    """skill -> task name (the columns; the synergy task, if shown, under its own name)."""
    scores: dict[str, dict[str, float]]
    """row -> skill -> accuracy."""
    retained: list[str]
    """The skills gain retention is computed over (the specialists' skills)."""

    def retention(self, row: str) -> dict[str, float]:
        base = self.scores["base"]
        return {
            s: gain_retention(self.scores[row][s], base[s], self.scores[f"specialist {s}"][s]) for s in self.retained
        }

    def best_hand_set(self) -> str:
        labels = [label for label, *_ in HAND_SET_MERGES if label in self.scores]
        return max(labels, key=lambda r: min(self.retention(r).values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "scores": self.scores,
            "gain_retention": {r: self.retention(r) for r in self.scores if r != "base"},
            "best_hand_set": self.best_hand_set()
            if any(label in self.scores for label, *_ in HAND_SET_MERGES)
            else None,
        }


def compare(
    zoo_json: Path,
    recipes: Mapping[str, Mapping[str, Any]],
    *,
    skills: Sequence[str] | None = None,
    synergy: bool = False,
    hand_set: bool = True,
    split: str = "test",
    progress: Any = None,
) -> Comparison:
    """Score the base, the specialists of ``skills`` (default: all), the hand-set merges of those
    specialists and ``recipes`` (label -> recipe dict) on the zoo's ``split``; with ``synergy`` the
    synergy task is a column too. ``progress(label)`` is called before each row."""
    from evomerge.eval.evaluator import CandidateEvaluator
    from evomerge.eval.tasks import Objective
    from evomerge.recipe import Recipe
    from evomerge.zoo.build import load_zoo

    meta = load_zoo(zoo_json)
    skills = list(skills or meta["models"])
    tasks = {s: meta["tasks"][s] for s in skills}
    if synergy:
        tasks[meta["synergy"]["name"]] = meta["synergy"]["task"]
    evaluator = CandidateEvaluator(
        [Objective(task=t, metric="acc", split=split) for t in tasks.values()],
        include_paths=[str(meta["include_path"])],
    )
    rows: dict[str, Any] = {"base": str(meta["base"])}
    rows.update({f"specialist {s}": str(meta["models"][s]) for s in skills})
    if hand_set:
        rows.update(hand_set_recipes(str(meta["base"]), [str(meta["models"][s]) for s in skills]))
    rows.update(recipes)
    scores: dict[str, dict[str, float]] = {}
    for label, what in rows.items():
        if progress is not None:
            progress(label)
        if isinstance(what, str):
            result = evaluator.evaluate_checkpoint(what)
        else:
            result = evaluator.evaluate(Recipe.from_dict(dict(what), source=label))
        scores[label] = {s: float(result.objectives[f"{t}/acc"]) for s, t in tasks.items()}
    return Comparison(tasks=tasks, scores=scores, retained=skills)

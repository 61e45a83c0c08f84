"""The candidate record: one scored (or failed) candidate, as the driver writes it and everyone reads it.

One line of ``evaluations.jsonl`` is ``CandidateRecord.to_json()``; the report, export, tracking and
the CLI read records back with ``from_json``, which also reads run dirs written by older versions
(missing optional fields take their defaults, unknown keys are ignored).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class CandidateStatus(str, enum.Enum):
    """Whether a candidate was scored: ``ok``, or ``failed`` (``reason`` says why)."""

    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate: its genes, the recipe they decode to, its scores and where and how it was scored."""

    id: int
    generation: int
    status: CandidateStatus
    objectives: Mapping[str, float] = field(default_factory=dict)
    """Objective label -> value (empty for a failed candidate)."""
    genome: tuple[float, ...] = ()
    recipe_hash: str = ""
    recipe: Mapping[str, Any] | None = None
    """The decoded recipe as a mapping (None in the slim copies tracking keeps in memory)."""
    reason: str | None = None
    worker: str = ""
    seconds: float = 0.0
    materialize_seconds: float = 0.0
    score_seconds: float = 0.0
    cached: bool = False
    """Not scored: an identical recipe's scores were reused."""
    attempts: int = 1
    time: float = 0.0
    """Unix time at which the record was written."""
    fidelity: str = "full"
    """``full``: scored on every configured item; ``screen``: on the screened objectives' item subsets
    only (multi-fidelity runs): such values are never ranked, reported or exported with full ones."""
    promoted_from: int | None = None
    """A full-fidelity score of a screened candidate: the id of its screen record."""

    @property
    def ok(self) -> bool:
        return self.status is CandidateStatus.OK

    @property
    def method(self) -> str:
        recipe = self.recipe or {}
        return str(recipe.get("merge_method") or ("moe" if "experts" in recipe else ""))

    @property
    def full(self) -> bool:
        """Scored on every configured item (not only a screen)."""
        return self.fidelity == "full"

    def has_all(self, labels: list[str]) -> bool:
        """Scored at full fidelity on every one of ``labels`` (a run's objectives): what the front, the
        best candidate, the export and the leaderboard's ranking read."""
        return self.ok and self.full and all(label in self.objectives for label in labels)

    def replace(self, **changes: Any) -> CandidateRecord:
        return dataclasses.replace(self, **changes)

    def slim(self) -> CandidateRecord:
        """A copy without the genome and the recipe (what a long run keeps of every candidate)."""
        return dataclasses.replace(self, genome=(), recipe={"merge_method": self.method} if self.recipe else None)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``evaluations.jsonl`` (key order kept stable for diffs)."""
        return {
            "id": self.id,
            "generation": self.generation,
            "genome": list(self.genome),
            "recipe_hash": self.recipe_hash,
            "recipe": dict(self.recipe) if self.recipe is not None else None,
            "objectives": dict(self.objectives),
            "status": self.status.value,
            "reason": self.reason,
            "worker": self.worker,
            "seconds": self.seconds,
            "materialize_seconds": self.materialize_seconds,
            "score_seconds": self.score_seconds,
            "cached": self.cached,
            "attempts": self.attempts,
            "time": self.time,
            **({"fidelity": self.fidelity} if not self.full else {}),
            **({"promoted_from": self.promoted_from} if self.promoted_from is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CandidateRecord:
        """A record from ``to_json``'s form, or from an older version's line (see the module docstring)."""
        try:
            status = CandidateStatus(data.get("status", "failed"))
        except ValueError:
            status = CandidateStatus.FAILED
        objectives = {str(k): float(v) for k, v in (data.get("objectives") or {}).items() if _is_number(v)}
        return cls(
            id=int(data["id"]),
            generation=int(data.get("generation") or 0),
            status=status,
            objectives=objectives,
            genome=tuple(float(v) for v in data.get("genome") or ()),
            recipe_hash=str(data.get("recipe_hash") or ""),
            recipe=data.get("recipe"),
            reason=data.get("reason"),
            worker=str(data.get("worker") or ""),
            seconds=float(data.get("seconds") or 0.0),
            materialize_seconds=float(data.get("materialize_seconds") or 0.0),
            score_seconds=float(data.get("score_seconds") or 0.0),
            cached=bool(data.get("cached", False)),
            attempts=int(data.get("attempts") or 1),
            time=float(data.get("time") or 0.0),
            fidelity=str(data.get("fidelity") or "full"),
            promoted_from=None if data.get("promoted_from") is None else int(data["promoted_from"]),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

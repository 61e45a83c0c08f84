"""``CandidateResult``: what scoring one candidate produced. Torch-free, so that the runtime's job
types and a worker that does not score models (a test's fake evaluator) load no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FIDELITIES", "CandidateResult", "Fidelity"]

Fidelity = Literal["screen", "full"]
"""What a candidate was scored on: ``screen``, each screened objective's fixed item subset (the others
in full), or ``full``, every configured item (see ``Objective.screen``)."""
FIDELITIES: tuple[Fidelity, ...] = ("screen", "full")


@dataclass
class CandidateResult:
    """What scoring one candidate produced."""

    recipe_hash: str
    status: Literal["ok", "failed"]
    objectives: dict[str, float] = field(default_factory=dict)
    """Objective label -> value (only when ok)."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """``task@split`` -> every metric the task reports."""
    items: dict[str, list[float]] = field(default_factory=dict)
    """Objective label -> its metric's value on each item (e.g. 0/1 for ``acc``), in the objective's item
    order: the per-item responses a run dir keeps (``responses.jsonl``)."""
    seconds: float = 0.0
    materialize_seconds: float = 0.0
    score_seconds: float = 0.0
    cached: bool = False
    reason: str | None = None
    fidelity: Fidelity = "full"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

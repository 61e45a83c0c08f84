"""Read a run directory back: records, objectives, the front, hypervolume, the best candidate.

Used by `evomerge front`, export and tracking; it only reads files, so it works on a live run, a
finished one or a killed one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.eval.tasks import Objective
from evomerge.search.front import hypervolume, pareto_indices, reference_point, to_minimize, weighted_score
from evomerge.search.record import CandidateRecord
from evomerge.search.rundir import RunDir

#: Run dirs written before directions were resolved from the tasks (round 1) saved ``direction: null``;
#: they were searched with this rule, so they are read back with it.
_LEGACY_MINIMIZED = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def legacy_direction(metric: str | None) -> str:
    """The direction a round-1 run dir (``direction: null``) was searched with."""
    return "minimize" if (metric or "") in _LEGACY_MINIMIZED else "maximize"


class RunReport:
    def __init__(self, config: dict[str, Any], records: list[CandidateRecord]):
        self.config = config
        self.records = records
        objectives = [Objective.model_validate(o) for o in config["objectives"]]
        self.labels = [o.label for o in objectives]
        self.directions = [o.direction or legacy_direction(o.metric) for o in objectives]
        self.weights = [o.weight for o in objectives]
        #: a finite optimizer's findings (optimizer.json: sweep fit, soup steps, its choice), if any
        self.optimizer_summary: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | Path) -> "RunReport":
        run_dir = RunDir(path)
        if not (run_dir.path / "run.yaml").exists():
            raise FileNotFoundError(f"{run_dir.path}: not a run directory (no run.yaml)")
        report = cls(run_dir.read_config(), list(run_dir.records()))
        report.optimizer_summary = run_dir.read_optimizer_summary()
        return report

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def ok(self) -> list[CandidateRecord]:
        return [r for r in self.records if r.has_all(self.labels)]

    def values(self, records: list[CandidateRecord]) -> list[list[float]]:
        return [[r.objectives[k] for k in self.labels] for r in records]

    def front(self) -> list[CandidateRecord]:
        """Non-dominated candidates (for one objective: the best one), by id."""
        ok = self.ok
        if not ok:
            return []
        if len(self.labels) == 1:
            return [self.best()]  # type: ignore[list-item]
        F = to_minimize(self.values(ok), self.directions)
        return sorted((ok[i] for i in pareto_indices(F)), key=lambda r: r.id)

    def best(self) -> CandidateRecord | None:
        ok = self.ok
        if not ok:
            return None
        return max(ok, key=lambda r: (self.score(r), -r.id))

    def score(self, record: CandidateRecord) -> float:
        return weighted_score([record.objectives[k] for k in self.labels], self.directions, self.weights)

    def hypervolume(self, records: list[CandidateRecord] | None = None) -> float:
        ok = self.ok if records is None else records
        if not ok:
            return 0.0
        F = to_minimize(self.values(ok), self.directions)
        references = [o.get("reference") for o in self.config["objectives"]]
        return hypervolume(F, reference_point(self.directions, references, F))

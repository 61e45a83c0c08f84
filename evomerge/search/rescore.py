"""Re-score front members on a held-out split, so a pick is made on numbers the search did not optimize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.atomic import write_text
from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective
from evomerge.search.picks import candidate_of
from evomerge.search.report import RunReport


def rescore_path(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / f"rescore-{split}.json"


def rescore_front(
    run_dir: str | Path, split: str = "test", *, device: str | None = None
) -> dict[int, dict[str, float]]:
    """Score every front member on ``split`` (all items), keyed by candidate id and objective label.

    Results are saved to ``RUN_DIR/rescore-<split>.json``; members already there are not scored again.
    """
    run_dir = Path(run_dir)
    report = RunReport.load(run_dir)
    path = rescore_path(run_dir, split)
    done: dict[int, dict[str, float]] = (
        {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    )
    todo = [r for r in report.front() if r.id not in done]
    if todo:
        objectives = []
        for raw, label in zip(report.config["objectives"], report.labels):
            data: dict[str, Any] = {**raw, "split": split, "limit": None, "subset_seed": None, "name": label}
            objectives.append(Objective.model_validate(data))
        evaluator = CandidateEvaluator(objectives, include_paths=report.config.get("include_paths", []), device=device)
        for record in todo:
            result = evaluator.evaluate(candidate_of(record))
            if not result.ok:
                raise RuntimeError(f"candidate {record.id} failed on {split}: {result.reason}")
            done[record.id] = result.objectives
        write_text(path, json.dumps({str(k): v for k, v in sorted(done.items())}, indent=2))
    return done


def load_rescores(run_dir: str | Path) -> dict[str, dict[int, dict[str, float]]]:
    """Every saved re-scoring of a run: split -> id -> label -> value."""
    out = {}
    for path in sorted(Path(run_dir).glob("rescore-*.json")):
        split = path.stem.removeprefix("rescore-")
        out[split] = {int(k): v for k, v in json.loads(path.read_text()).items()}
    return out

"""search/record.py and search/rundir.py: the typed candidate record, and run dirs written by round 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from search_support import search

from evomerge.recipe import Recipe
from evomerge.search.record import CandidateRecord, CandidateStatus
from evomerge.search.rundir import RunDir

DATA = Path(__file__).parent / "data"


def test_json_round_trip_keeps_every_field_and_the_line_format() -> None:
    record = CandidateRecord(
        id=3,
        generation=1,
        status=CandidateStatus.OK,
        objectives={"a": 0.5},
        genome=(0.1, 0.2),
        recipe_hash="abc",
        recipe={"merge_method": "linear"},
        worker="w0",
        seconds=1.5,
        cached=True,
        attempts=2,
        time=12.0,
    )
    data = json.loads(json.dumps(record.to_json()))
    assert CandidateRecord.from_json(data) == record
    assert list(data) == [
        "id",
        "generation",
        "genome",
        "recipe_hash",
        "recipe",
        "objectives",
        "status",
        "reason",
        "worker",
        "seconds",
        "materialize_seconds",
        "score_seconds",
        "cached",
        "attempts",
        "time",
    ]
    assert record.slim().recipe == {"merge_method": "linear"} and record.slim().genome == ()


def test_older_and_odd_lines_are_read_with_defaults() -> None:
    record = CandidateRecord.from_json({"id": 7, "status": "weird", "objectives": {"a": None, "b": 1}})
    assert record.status is CandidateStatus.FAILED and not record.ok
    assert record.objectives == {"b": 1.0} and record.attempts == 1 and record.recipe is None


@pytest.mark.parametrize("optimizer", ["nsga2", "cma"])
def test_a_round_1_run_dir_resumes_to_the_same_candidates(random_family, tmp_path, optimizer) -> None:
    """tests/data/rundir-v1-*: 9 candidates written by round 1's code (commit 555b790, fake evaluator);
    resumed by today's code to the budget of 24, it ends where an uninterrupted run of today's code ends."""
    old = tmp_path / "old"
    shutil.copytree(DATA / f"rundir-v1-{optimizer}", old)
    family = str(random_family["base"].parent)
    for name in ("run.yaml", "evaluations.jsonl"):
        path = old / name
        path.write_text(path.read_text().replace("@FAMILY@", family))
    lines = [json.loads(line) for line in (old / "evaluations.jsonl").read_text().splitlines()]
    for line in lines:  # recipe hashes cover model paths: recompute them for this machine's family
        line["recipe_hash"] = Recipe.from_dict(line["recipe"]).content_hash()
    (old / "evaluations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    resumed = search(random_family, tmp_path, old, resume=True, **{"optimizer.name": optimizer})
    whole = search(random_family, tmp_path, tmp_path / "whole", **{"optimizer.name": optimizer})
    assert resumed.evaluated == whole.evaluated == 24
    a, b = list(RunDir(old).records()), list(RunDir(tmp_path / "whole").records())
    assert [r.id for r in a] == list(range(24))
    assert [r.genome for r in a] == [r.genome for r in b]
    assert [dict(r.objectives) for r in a] == [dict(r.objectives) for r in b]
    assert [r.id for r in resumed.front] == [r.id for r in whole.front]

"""Multi-fidelity search (``Objective.screen``): each generation is scored on a fixed seeded subset of
the items first, its best share is promoted to every item, the optimizer is told the two kinds of
values apart, the front and the export read full scores only, and a resumed run re-scores nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from search_support import search_zoo, zoo_pair_config

from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective
from evomerge.search.config import ConfigError, resolve_run_config
from evomerge.search.front import pareto_indices, to_minimize
from evomerge.search.optimizers import CMAES, NSGA2, scalarized, screened_below_full
from evomerge.search.report import RunReport
from evomerge.search.rundir import RunDir

LABELS = ["zoo_latin/acc", "zoo_greek/acc"]


def config(zoo_dir: Path, **optimizer) -> dict:
    objectives = [
        {"task": "zoo_latin", "metric": "acc", "limit": 16, "screen": 4},
        {"task": "zoo_greek", "metric": "acc", "limit": 16, "screen": 4},
    ]
    return zoo_pair_config(zoo_dir, objectives, budget=8, scalarize="worst", **optimizer)


def search(zoo_dir: Path, run_dir: Path, *, resume: bool = False, workers: int = 0, budget: int = 8) -> None:
    search_zoo(config(zoo_dir), run_dir, budget=budget, resume=resume, workers=workers)


@pytest.fixture(scope="module")
def screened_run(zoo_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("screened") / "run"
    search(zoo_dir, run_dir)
    return run_dir


def test_the_screen_is_a_fixed_subset_of_the_objectives_items(zoo_dir) -> None:
    objectives = [Objective(task="zoo_latin", metric="acc", limit=16, screen=4)]
    evaluator = CandidateEvaluator(objectives, include_paths=[str(zoo_dir / "tasks")])
    again = CandidateEvaluator(objectives, include_paths=[str(zoo_dir / "tasks")])
    [full], [screen] = evaluator.selections("full"), evaluator.selections("screen")
    assert len(full.doc_ids) == 16 and len(screen.doc_ids) == 4
    assert set(screen.doc_ids) < set(full.doc_ids) and screen.doc_ids == sorted(screen.doc_ids)
    assert screen.doc_ids == again.selections("screen")[0].doc_ids  # the same in every worker
    assert screen.doc_ids != full.doc_ids[:4]  # drawn, not the first ones


def test_every_generation_is_screened_then_its_best_share_is_scored_in_full(screened_run) -> None:
    run_dir = RunDir(screened_run)
    records = {r.id: r for r in run_dir.records()}
    responses = run_dir.responses()
    screens = [r for r in records.values() if r.promoted_from is None]
    promotions = [r for r in records.values() if r.promoted_from is not None]
    assert len(screens) == 8 and all(r.fidelity == "screen" for r in screens)
    assert promotions and all(r.fidelity == "full" for r in promotions)
    for record in screens:  # 4 items each
        assert {len(v) for v in responses[record.id].values()} == {4}
    for record in promotions:
        screen = records[record.promoted_from]
        assert record.recipe_hash == screen.recipe_hash and record.generation == screen.generation
        full_items = responses.get(record.id) or run_dir.responses_by_hash()[record.recipe_hash]
        assert {len(v) for v in full_items.values()} == {16}
    # per generation of 4: ceil(0.25 * 4) = 1 promoted, the best by CMA-ES's own ranking (worst skill)
    for generation in (0, 1):
        members = sorted((r for r in screens if r.generation == generation), key=lambda r: r.id)
        promoted = {r.promoted_from for r in promotions if r.generation == generation}
        F = to_minimize([[r.objectives[k] for k in LABELS] for r in members], ["maximize"] * 2)
        order = CMAES(2, 2, population=4, seed=0, scalarize="worst").promotion_order(F)
        assert members[int(order[0])].id in promoted


def test_screen_values_are_the_full_values_on_the_screened_items(screened_run, zoo_dir) -> None:
    """The screen is the same items scored the same way: a promoted candidate's full responses, read
    at the screened positions, are its screen responses."""
    objectives = [Objective(task="zoo_latin", metric="acc", limit=16, screen=4)]
    evaluator = CandidateEvaluator(objectives, include_paths=[str(zoo_dir / "tasks")])
    full_ids = evaluator.selections("full")[0].doc_ids
    positions = [full_ids.index(d) for d in evaluator.selections("screen")[0].doc_ids]
    run_dir = RunDir(screened_run)
    responses, by_hash = run_dir.responses(), run_dir.responses_by_hash()
    for record in run_dir.records():
        if record.promoted_from is None or record.cached:
            continue
        screen = responses[record.promoted_from]["zoo_latin/acc"]
        full = (responses.get(record.id) or by_hash[record.recipe_hash])["zoo_latin/acc"]
        assert [full[p] for p in positions] == screen


def test_front_best_and_leaderboard_read_full_scores_only(screened_run) -> None:
    report = RunReport.load(screened_run)
    assert report.ok and all(r.fidelity == "full" for r in report.ok)
    assert all(r.fidelity == "full" for r in report.front())
    assert report.best() is not None and report.best().fidelity == "full"


def test_screened_candidates_on_the_front_are_promoted_when_the_run_ends(screened_run) -> None:
    """No screened candidate is left unpromoted on the front of every candidate's best-known scores
    (unless the final promotions' cap, a population of them, was reached)."""
    records = list(RunDir(screened_run).records())
    promoted = {r.promoted_from for r in records if r.promoted_from is not None}
    last_screen = max(r.id for r in records if r.promoted_from is None)
    # promotions after the last generation's own: the final ones
    final = [r for r in records if r.promoted_from is not None and r.id > last_screen + 1]
    pool = [r for r in records if r.ok and (r.full or r.id not in promoted)]
    F = to_minimize([[r.objectives[k] for k in LABELS] for r in pool], ["maximize"] * 2)
    assert final  # the run ended with screened candidates on that front: they were scored in full
    assert all(pool[i].full for i in pareto_indices(F)) or len(final) == 4


def test_a_resumed_screened_run_asks_what_an_uninterrupted_one_does_and_rescores_nothing(zoo_dir, tmp_path) -> None:
    search(zoo_dir, tmp_path / "straight", budget=12)
    search(zoo_dir, tmp_path / "resumed", budget=4)
    first = {r.id: r for r in RunDir(tmp_path / "resumed").records()}
    search(zoo_dir, tmp_path / "resumed", budget=12, resume=True)

    def asked(run: Path) -> list[str]:
        return [r.recipe_hash for r in RunDir(run).records() if r.promoted_from is None]

    assert asked(tmp_path / "straight") == asked(tmp_path / "resumed")
    records = list(RunDir(tmp_path / "resumed").records())
    assert [r for r in records if r.id in first] == list(first.values())  # kept as they were
    lines = (tmp_path / "resumed" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == sum(1 for r in records if r.ok and not r.cached)  # nothing scored twice


@pytest.mark.slow
def test_a_screened_run_on_ray_workers_matches_the_in_process_one(zoo_dir, tmp_path, local_ray) -> None:
    search(zoo_dir, tmp_path / "inprocess", budget=8)
    search(zoo_dir, tmp_path / "ray", budget=8, workers=2)

    def rows(run: Path) -> list[tuple]:
        return [(r.id, r.recipe_hash, r.fidelity, r.promoted_from, dict(r.objectives)) for r in RunDir(run).records()]

    assert sorted(rows(tmp_path / "ray")) == sorted(rows(tmp_path / "inprocess"))


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.booleans(), st.booleans()), min_size=2, max_size=10
    ),
    weights=st.tuples(st.floats(0.1, 3), st.floats(0.1, 3)),
)
def test_screened_rows_are_told_below_every_full_row_and_keep_their_ranks(values, weights) -> None:
    """Every screened row worse than every full row in every objective (so also by any scalarization),
    and among screened rows the order by the weighted sum and by the worst weighted objective (what
    CMA-ES ranks on) and dominance unchanged."""
    F = np.array([[a, b] for a, b, _, _ in values])
    full = np.array([f for _, _, f, _ in values])
    F[np.array([bad for *_, bad in values]), 0] = math.nan
    told = screened_below_full(F, full, weights)
    w = np.array(weights)
    assert np.array_equal(np.isnan(told), np.isnan(F))
    assert np.array_equal(told[full], F[full], equal_nan=True)
    for j in range(2):
        top, low = told[full, j], told[~full, j]
        if np.isfinite(top).any() and np.isfinite(low).any():
            assert np.nanmin(low) > np.nanmax(top)
    screened = np.flatnonzero(~full & np.isfinite(F).all(axis=1))
    for how in ("weighted_sum", "worst"):
        before = scalarized(F[screened], w, how)
        after = scalarized(told[screened], w, how)
        order = np.argsort(before, kind="stable")
        assert np.all(np.diff(after[order]) >= -1e-9 * (1 + np.abs(after).max(initial=0)))  # no two swap


def test_nsga2_promotes_by_pareto_rank_then_weighted_sum() -> None:
    F = np.array([[0.5, 0.5], [0.0, 1.0], [0.6, 0.6], [1.0, 0.0], [0.2, 0.2]])
    order = NSGA2(2, 2, population=6, seed=0).promotion_order(F)
    assert list(order[:2]) == [4, 1] and set(order[:4]) == {4, 1, 3, 0} and order[-1] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": {"name": "sweep"}}, "optimizer.name cma / nsga2 / random"),
        ({"optimizer": {"name": "cma", "mode": "async"}}, "optimizer.mode barrier"),
        (
            {"objectives": [{"task": "zoo_latin", "metric": "acc", "limit": 16, "screen": 16}]},
            "not fewer than its limit",
        ),
        ({"objectives": [{"task": "zoo_latin", "metric": "acc"}], "optimizer": {"promote": 0.5}}, "optimizer.promote"),
        (
            {
                "objectives": [
                    {"task": "zoo_latin", "metric": "acc", "limit": 16, "screen": 4},
                    {"task": "zoo_latin", "metric": "acc_norm", "limit": 16, "screen": 8},
                ]
            },
            "take the same screen",
        ),
    ],
)
def test_bad_screening_configs_are_refused_naming_the_field(zoo_dir, tmp_path, change, message) -> None:
    data = config(zoo_dir)
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(data, base_dir=tmp_path)


def test_a_run_stopped_mid_generation_and_resumed_scores_each_candidate_in_full_at_most_once(zoo_dir, tmp_path) -> None:
    """Budget 6 with generations of 4 stops inside the second generation; the end-of-run promotions may
    score some of it in full; the resumed run's own promotions then reuse those records. Resuming a
    finished run again adds nothing."""
    run = tmp_path / "run"
    search(zoo_dir, run, budget=6)
    search(zoo_dir, run, budget=12, resume=True)
    records = list(RunDir(run).records())
    promoted = [r.promoted_from for r in records if r.promoted_from is not None]
    assert len(promoted) == len(set(promoted))
    assert sum(1 for r in records if r.promoted_from is None) == 12
    before = len(records)
    search(zoo_dir, run, budget=12, resume=True)
    search(zoo_dir, run, budget=12, resume=True)
    assert len(list(RunDir(run).records())) == before

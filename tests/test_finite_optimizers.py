"""search/sweep and search/soups: the plans, the fit, the soup rules, and a search that runs them."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from search_support import run_config, search

from evomerge.search.config import ConfigError, resolve_run_config
from evomerge.search.picks import PickError, pick
from evomerge.search.registry import make_optimizer
from evomerge.search.report import RunReport
from evomerge.search.sweep import fit_quadratic, fitted_argmin, quadratic_features


def drive(opt, objective):
    """Ask/tell until the optimizer is finished (pickling it between calls, as the driver's state does)."""
    asked = []
    while not opt.finished:
        X = opt.ask()
        assert len(X), "an unfinished optimizer asked nothing"
        opt.tell(X, np.stack([objective(x) for x in X]))
        opt = pickle.loads(pickle.dumps(opt))
        asked.append(X)
    assert len(opt.ask()) == 0
    return opt, asked


def test_quadratic_fit_recovers_a_known_quadratic_and_its_argmin() -> None:
    rng = np.random.default_rng(0)
    X = rng.random((30, 2))
    true = np.array([0.3, -1.0, 0.4, 2.0, 0.5, 1.5])  # 0.3 - x1 + 0.4 x2 + 2 x1^2 + 0.5 x1 x2 + 1.5 x2^2
    coefficients = fit_quadratic(X, quadratic_features(X) @ true)
    assert np.allclose(coefficients, true)
    # stationary point: grad = [-1 + 4 x1 + 0.5 x2, 0.4 + 0.5 x1 + 3 x2] = 0
    expected = np.linalg.solve([[4.0, 0.5], [0.5, 3.0]], [1.0, -0.4])
    expected = np.clip(expected, 0, 1)  # x2 < 0 here: the constrained optimum is on the x2 = 0 edge
    edge = np.array([0.25, 0.0])  # on x2 = 0 the fit is 0.3 - x1 + 2 x1^2, lowest at x1 = 1/4
    assert expected[1] == 0.0
    assert np.allclose(fitted_argmin(coefficients, 2), edge, atol=0.01)


def test_sweep_scores_the_grid_then_the_fitted_optimum() -> None:
    opt = make_optimizer("sweep", 1, 2, population=8, seed=0, grid=5)
    assert opt.planned == 6
    # two objectives to minimize, summed: (x - 0.2)^2 + (x - 0.5)^2 is lowest at x = 0.35, between grid points
    opt, asked = drive(opt, lambda x: np.array([(x[0] - 0.2) ** 2, (x[0] - 0.5) ** 2]))
    assert [len(X) for X in asked] == [5, 1]
    assert np.allclose(asked[0][:, 0], np.linspace(0, 1, 5))
    assert asked[1][0, 0] == pytest.approx(0.35, abs=1e-3)


def test_sweep_summary_and_refusals() -> None:
    opt = make_optimizer("sweep", 2, 1, population=8, seed=0, scalarize="worst")
    X = opt.ask()
    assert X.shape == (25, 2)
    F = ((X - [0.6, 0.3]) ** 2).sum(1, keepdims=True)
    F[3] = np.nan  # one failed grid point: left out of the fit, recorded as null
    opt.tell(X, F)
    pick = opt.ask()
    assert np.allclose(pick[0], [0.6, 0.3], atol=0.01)
    opt.tell(pick, np.array([[0.0]]))
    summary = opt.summary()
    assert opt.finished and summary["pick_measured"] == 0.0
    assert summary["points"][3][2] is None and len(summary["points"]) == 25
    assert json.loads(json.dumps(summary)) == summary
    with pytest.raises(ValueError, match="3 genes; a sweep covers 1 or 2"):
        make_optimizer("sweep", 3, 1, population=8, seed=0)
    with pytest.raises(RuntimeError, match="barrier"):
        opt.ask_one()


def test_uniform_soup_scores_each_ingredient_and_the_average() -> None:
    opt = make_optimizer("uniform_soup", 3, 1, population=8, seed=0)
    opt, asked = drive(opt, lambda x: np.array([-float(x.sum() == 3) - 0.1 * x[1]]))  # the full soup is best
    assert len(asked) == 1 and asked[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
    summary = opt.summary()
    assert summary["best_ingredient"] == 1 and summary["soup_at_least_best_ingredient"]


def test_greedy_soup_adds_an_ingredient_only_when_the_score_does_not_drop() -> None:
    # scores (to minimize) of each subset: ingredient 2 alone is best, then 0, then 1; adding 0 helps,
    # adding 1 to {0, 2} hurts; {0, 2} ties nothing
    values = {(2,): -0.5, (0,): -0.4, (1,): -0.3, (0, 2): -0.6, (0, 1, 2): -0.55}

    def objective(x):
        return np.array([values[tuple(int(i) for i in np.flatnonzero(x))]])

    opt = make_optimizer("greedy_soup", 3, 1, population=8, seed=0)
    assert opt.planned == 5
    opt, asked = drive(opt, objective)
    assert [X.tolist() for X in asked] == [
        np.eye(3).tolist(),
        [[1.0, 0.0, 1.0]],  # best (2) + next best (0)
        [[1.0, 1.0, 1.0]],  # + 1: worse than {0, 2}, so it is not kept
    ]
    summary = opt.summary()
    assert summary["order"] == [2, 0, 1] and summary["soup"] == [0, 2]
    assert [s["kept"] for s in summary["steps"]] == [True, False]
    assert summary["soup_value"] == -0.6


def test_greedy_soup_keeps_a_tie_and_skips_a_failed_addition() -> None:
    opt = make_optimizer("greedy_soup", 3, 1, population=8, seed=0)
    opt.tell(opt.ask(), np.array([[-1.0], [-0.5], [-0.2]]))
    opt.tell(opt.ask(), np.array([[-1.0]]))  # {0, 1} ties {0}: kept
    opt.tell(opt.ask(), np.array([[np.nan]]))  # {0, 1, 2} failed: not kept
    assert opt.finished and opt.summary()["soup"] == [0, 1]
    assert opt.summary()["steps"][1] == {"ingredient": 2, "value": None, "kept": False}


# --- in a run config and a search ---------------------------------------------------------------------


def soup_config(family, tmp_path, **overrides) -> dict:
    config = run_config(family, tmp_path, **overrides)
    config["search_space"] = {
        "models": [str(family[k]) for k in ("a", "b", "c")],
        "method": "linear",
        "parameters": {"weight": {"low": 0, "high": 1}},
    }
    config["optimizer"]["name"] = "greedy_soup"
    return config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "task_arithmetic", "base_model": "a"}, "method must be linear"),
        ({"parameters": {"weight": {"low": 0.2, "high": 1}}}, "exactly weight: {low: 0, high: 1}"),
        ({"granularity": "layer"}, "granularity must be model"),
        ({"normalize": False}, "normalize must be true or unset"),
    ],
)
def test_a_soup_refuses_a_space_that_is_not_one_weight_per_checkpoint(random_family, tmp_path, change, message) -> None:
    config = soup_config(random_family, tmp_path)
    space = config["search_space"]
    space.update({k: str(random_family[v]) if k == "base_model" else v for k, v in change.items()})
    with pytest.raises(ConfigError, match=f"optimizer greedy_soup: .*{message}"):
        resolve_run_config(config, base_dir=tmp_path)


def test_finite_optimizers_refuse_async_mode_and_grid_is_for_sweeps(random_family, tmp_path) -> None:
    config = soup_config(random_family, tmp_path)
    config["optimizer"]["mode"] = "async"
    with pytest.raises(ConfigError, match="optimizer.mode: greedy_soup runs in barrier mode only"):
        resolve_run_config(config, base_dir=tmp_path)
    config = run_config(random_family, tmp_path)
    config["optimizer"]["grid"] = 5
    with pytest.raises(ConfigError, match="optimizer.grid: only the sweep"):
        resolve_run_config(config, base_dir=tmp_path)


def test_a_greedy_soup_search_stops_when_done_and_leaves_its_steps(random_family, tmp_path, monkeypatch) -> None:
    import search_support

    monkeypatch.setattr(search_support, "run_config", soup_config)
    run_dir = tmp_path / "run"
    summary = search(random_family, tmp_path, run_dir)
    assert summary.stopped == "done" and summary.evaluated == 5  # 3 alone, then 2 additions
    found = json.loads((run_dir / "optimizer.json").read_text())
    assert found["optimizer"] == "greedy_soup" and len(found["genes"]) == 3 and len(found["steps"]) == 2
    report = RunReport.load(run_dir)
    chosen = pick(report, "auto")  # export's default: the soup the greedy soup ended with
    assert chosen.id == found["choice_id"] and list(chosen.genome) == found["choice"]
    assert pick(report, "optimizer") == chosen
    with pytest.raises(PickError, match="only sweep, soups and gradient"):
        report.optimizer_summary = None
        pick(report, "optimizer")
    again = search(random_family, tmp_path, run_dir, resume=True)  # a finished plan asks nothing more
    assert again.stopped == "done" and again.evaluated == 5
    assert len((run_dir / "evaluations.jsonl").read_text().splitlines()) == 5


def test_a_sweep_search_over_one_weight_finds_the_fitted_optimum(random_family, tmp_path) -> None:
    # the fake scorer: objective k = 1 - (w - target_k)^2 with targets 1/3 and 2/3, so their sum peaks at 0.5
    overrides = {
        "search_space.models": [str(random_family["a"])],
        "search_space.granularity": "model",
        "optimizer.name": "sweep",
        "optimizer.grid": 4,
    }
    run_dir = tmp_path / "sweep"
    summary = search(random_family, tmp_path, run_dir, **overrides)
    assert summary.stopped == "done" and summary.evaluated == 5
    found = json.loads((run_dir / "optimizer.json").read_text())
    assert found["pick"] == pytest.approx([0.5], abs=1e-3)
    assert summary.best is not None and summary.best.objectives["first"] == pytest.approx(1 - (0.5 - 1 / 3) ** 2)


def test_the_optimizer_plots_draw_a_2_gene_sweep_and_a_soup(tmp_path) -> None:
    from PIL import Image

    from evomerge.tracking.plots import plot_optimizer_summary

    opt = make_optimizer("sweep", 2, 1, population=8, seed=0, grid=3)
    X = opt.ask()
    opt.tell(X, ((X - 0.4) ** 2).sum(1, keepdims=True))
    opt.tell(opt.ask(), np.array([[0.01]]))
    soup = make_optimizer("greedy_soup", 3, 1, population=8, seed=0)
    soup.tell(soup.ask(), np.array([[-1.0], [-0.5], [np.nan]]))
    drawn = {
        "sweep": {"optimizer": "sweep", "genes": ["t[g0]", "weight[b][g0]"], **opt.summary()},
        "soup": {
            "optimizer": "greedy_soup",
            "genes": ["weight[a][g0]", "weight[b][g0]", "weight[c][g0]"],
            **soup.summary(),
        },
    }
    for name, summary in drawn.items():
        path = plot_optimizer_summary(tmp_path / f"{name}.png", summary)
        assert path is not None and Image.open(path).size[0] > 300
    assert plot_optimizer_summary(tmp_path / "none.png", {"optimizer": "cma"}) is None

"""search/optimizers: determinism per seed, CMA-ES progress and scalarizations."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.registry import make_optimizer


@pytest.mark.parametrize("name", ["cma", "nsga2", "random"])
def test_same_seed_and_scores_give_the_same_candidates(name) -> None:
    def run(seed: int) -> list[np.ndarray]:
        opt = make_optimizer(name, 5, 2, population=6, seed=seed, sigma=0.3)
        asked = []
        for _ in range(4):
            X = opt.ask()
            F = np.stack([((X - 0.2) ** 2).sum(1), ((X - 0.8) ** 2).sum(1)], axis=1)
            F[1] = np.nan  # a failed candidate
            opt.tell(X, F)
            asked.append(X)
        return asked

    first, again, other = run(0), run(0), run(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert all(((X >= 0) & (X <= 1)).all() for X in first)


def test_cma_improves_on_a_simple_landscape() -> None:
    opt = make_optimizer("cma", 4, 1, population=8, seed=0, sigma=0.3)
    best = []
    for _ in range(12):
        X = opt.ask()
        F = ((X - 0.25) ** 2).sum(1, keepdims=True)
        opt.tell(X, F)
        best.append(F.min())
    assert best[-1] < best[0] / 10


def test_cma_starts_at_x0() -> None:
    """optimizer.x0 (the driver passes it for every gene) is where CMA-ES's first generation is centred."""
    opt = make_optimizer("cma", 6, 1, population=4, seed=0, x0=[0.25] * 6)
    assert np.allclose(opt.es.mean, 0.25)
    assert np.allclose(make_optimizer("cma", 6, 1, population=4, seed=0).es.mean, 0.5)


def test_nsga2_first_population_holds_the_initial_points() -> None:
    """optimizer.initial: e.g. the hand-set merges join NSGA-II's first generation; the rest is random."""
    opt = make_optimizer("nsga2", 4, 2, population=6, seed=0, initial=[[0.25] * 4, [0.5] * 4])
    X = opt.ask()
    assert X.shape == (6, 4)
    assert np.allclose(X[0], 0.25) and np.allclose(X[1], 0.5)
    assert len({tuple(x) for x in X[2:]}) == 4  # the others drawn at random
    with pytest.raises(ValueError, match="3 points do not fit a population of 2"):
        make_optimizer("nsga2", 4, 2, population=2, seed=0, initial=[[0.1] * 4] * 3)


def test_cma_scalarizations() -> None:
    """weighted_sum adds the objectives; worst keeps the worst one, so a balanced candidate beats a
    lopsided one with the same sum; bad names are refused with the valid ones."""
    F = np.array([[-1.0, 0.0], [-0.5, -0.5], [np.nan, -2.0]])
    summed = make_optimizer("cma", 3, 2, population=4, seed=0).scalar(F)
    worst = make_optimizer("cma", 3, 2, population=4, seed=0, scalarize="worst").scalar(F)
    assert summed[:2].tolist() == [-1.0, -1.0]
    assert worst[:2] == pytest.approx([0.0, -0.5], abs=1e-3)
    assert worst[2] > worst[:2].max()  # a failed candidate (NaN) is penalized below every finite one
    # equal worst objectives: the better mean ranks first (a flat weakest skill still gives CMA-ES a direction)
    tied = make_optimizer("cma", 3, 2, population=4, seed=0, scalarize="worst").scalar(
        np.array([[-0.5, -0.5], [-0.9, -0.5], [-0.4, -0.6]])
    )
    assert tied[1] < tied[0] < tied[2]
    with pytest.raises(ValueError, match="scalarize.*weighted_sum, worst"):
        make_optimizer("cma", 3, 2, population=4, seed=0, scalarize="median")


# --- steady state (optimizer.mode: async) ----------------------------------------------------------


def steady(name: str, seed: int, steps: int = 120, workers: int = 4, order_seed: int = 0) -> list[np.ndarray]:
    """Drive ask_one/tell_one as the async driver does: ``workers`` in flight, results told in a
    seeded random arrival order, the optimizer pickled and restored after every call."""
    import pickle

    opt = make_optimizer(name, 4, 2, population=6, seed=seed, sigma=0.3)
    arrival = np.random.default_rng(order_seed)
    in_flight: list[np.ndarray] = []
    told = []
    for _ in range(steps):
        while len(in_flight) < workers:
            in_flight.append(opt.ask_one())
            opt = pickle.loads(pickle.dumps(opt))
        x = in_flight.pop(int(arrival.integers(len(in_flight))))
        f = np.array([((x - 0.2) ** 2).sum(), ((x - 0.8) ** 2).sum()])
        if len(told) == 3:
            f[:] = np.nan  # a failed candidate
        opt.tell_one(x, f)
        opt = pickle.loads(pickle.dumps(opt))
        told.append(x)
    return told


@pytest.mark.parametrize("name", ["cma", "nsga2", "random"])
def test_steady_state_is_a_function_of_seed_and_arrival_order(name) -> None:
    first, again = steady(name, 0), steady(name, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(np.stack(first), np.stack(steady(name, 1)))
    if name != "random":  # a different arrival order is a different run
        assert not np.array_equal(np.stack(first), np.stack(steady(name, 0, order_seed=1)))
    assert all(((x >= 0) & (x <= 1)).all() for x in first)


def test_steady_state_optimizers_make_progress() -> None:
    """The Pareto set is the diagonal segment from 0.2 to 0.8 in every gene: the last candidates must
    lie much closer to it than the first ones, for CMA-ES and NSGA-II (as in barrier mode, where the
    same measure falls from 0.14 to 0.00 for CMA-ES and 0.22 to 0.13 for NSGA-II)."""
    for name in ("cma", "nsga2"):
        told = np.stack(steady(name, 0, steps=240))
        mean = told.mean(1)
        off_front = ((told - mean[:, None]) ** 2).sum(1) + np.clip(0.2 - mean, 0, None) ** 2
        off_front += np.clip(mean - 0.8, 0, None) ** 2
        assert off_front[-40:].mean() < off_front[:40].mean() / 2, name

"""Optimizers behind one ask/tell interface over x in [0,1]^d.

All of them minimize a matrix of objective values ``F`` (one row per candidate); the driver turns
"maximize" objectives into their negatives. ``ask`` returns a batch (a population); ``tell`` takes
that batch back with its values, in the same order. The whole object pickles, which is how a run's
state is checkpointed: same seed and same scores give the same sequence of candidates.

- ``cma``: CMA-ES (package ``cma``), bounded to [0,1], objectives combined into one value:
  ``weighted_sum`` (the default) or ``worst`` (the largest weighted value, i.e. the worst objective:
  a merge scores only as well as its weakest skill, which steers toward merges that keep every
  skill instead of one specialist rebuilt inside the merge).
- ``nsga2``: NSGA-II (package ``pymoo``) through its ask/tell API, all objectives kept.
- ``random``: uniform random search, the baseline every other method must beat.

Finite optimizers (``sweep.py``, ``soups.py``) have a plan of known length: they say ``finished``
once it is done (the driver then stops with "done") and leave a ``summary()`` of what they found.

Each also has a steady-state interface for ``optimizer.mode: async`` (no generation barrier):
``ask_one`` proposes one candidate whenever a worker frees up and ``tell_one`` takes one result as it
arrives. CMA-ES samples a population at a time and updates once ``population`` results have come
back, whichever population they were drawn from (points from an older distribution are told like
injected ones); NSGA-II is the (mu+1) steady-state variant: each offspring is bred from the current
population by NSGA-II's own tournament, crossover and mutation, and each result joins the population
through its rank-and-crowding survival. The state still pickles after every call, and the same
sequence of tells gives the same state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np


class Optimizer(ABC):
    name: str

    def __init__(
        self, dim: int, n_objectives: int, *, population: int, seed: int, weights: Sequence[float] | None = None
    ):
        if dim < 1:
            raise ValueError("the search space has no genes")
        if population < 2:
            raise ValueError(f"optimizer.population: must be >= 2, got {population}")
        self.dim = dim
        self.n_objectives = n_objectives
        self.population = population
        self.seed = seed
        self.weights = np.asarray(weights if weights is not None else [1.0] * n_objectives, dtype=float)

    @abstractmethod
    def ask(self) -> np.ndarray:
        """The next batch of candidates, shape (n, dim), every gene in [0, 1]."""

    @abstractmethod
    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        """Values (to minimize) for a batch from ``ask``; rows of failed candidates are NaN."""

    # --- steady state (optimizer.mode: async) ---------------------------------------------------------
    @abstractmethod
    def ask_one(self) -> np.ndarray:
        """One candidate, shape (dim,), for a worker that just freed up."""

    @abstractmethod
    def tell_one(self, x: np.ndarray, f: np.ndarray) -> None:
        """The values (to minimize; NaN when it failed) of one candidate from ``ask_one``."""

    #: how many candidates the optimizer will ask in all (finite optimizers); None: as many as asked for
    planned: int | None = None

    @property
    def finished(self) -> bool:
        """True once a finite optimizer has asked and been told everything it plans to."""
        return False

    def summary(self) -> dict[str, Any] | None:
        """What a finite optimizer found (its fit, its picks), JSON-ready; None for the open-ended ones."""
        return None

    def promotion_order(self, F: np.ndarray) -> np.ndarray:
        """Row indices of ``F`` best first, as this optimizer ranks candidates: the order in which a
        screened generation is promoted to full scoring (multi-fidelity runs). Here: Pareto rank
        (non-dominated sorting), then the weighted sum, then the row."""
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        P = self._penalize(np.atleast_2d(F))
        rank = np.empty(len(P))
        for level, members in enumerate(NonDominatedSorting().do(P)):
            rank[members] = level
        return np.lexsort((np.arange(len(P)), (P * self.weights).sum(axis=1), rank))

    @staticmethod
    def _penalize(F: np.ndarray) -> np.ndarray:
        """Failed candidates (NaN/Inf rows) get a value worse than every finite one in the batch."""
        F = np.array(F, dtype=float, copy=True)
        finite = np.isfinite(F)
        for j in range(F.shape[1]):
            column = F[finite[:, j], j]
            worst = column.max() + 1.0 + abs(column.max()) if column.size else 1e6
            F[~finite[:, j], j] = worst
        return F


def screened_below_full(
    F: np.ndarray, full: np.ndarray, weights: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """The values to tell for a generation scored at two fidelities (multi-fidelity runs): rows scored in
    full as they are; every screened row (``full`` False) moved to just worse than every full row in
    every objective, by one shift in weighted units (objective j moves by s / w_j), so that among the
    screened rows neither the weighted sum, nor the worst weighted objective, nor dominance changes.
    So no optimizer ever compares a screen score with a full score as if they were equal: it sees the
    promoted candidates ranked by their full scores, then the rest by their screen scores, each ranked
    as it would be on its own. Failed rows (NaN) stay NaN."""
    F = np.array(F, dtype=float, copy=True)
    full = np.asarray(full, dtype=bool)
    if full.all() or not full.any() or F.size == 0:
        return F
    w = np.ones(F.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    w = np.where(w > 0, w, 1.0)  # an objective of weight 0 counts nowhere; it moves like one of weight 1
    weighted = F * w
    gaps = []
    for j in range(F.shape[1]):
        top = weighted[full, j][np.isfinite(weighted[full, j])]
        low = weighted[~full, j][np.isfinite(weighted[~full, j])]
        if top.size and low.size:
            gaps.append(top.max() - low.min())
    if not gaps:
        return F
    reach = max(abs(v) for v in weighted[np.isfinite(weighted)])
    shift = max(0.0, max(gaps)) + 1e-6 * (1.0 + reach)
    rows = ~full
    F[rows] = F[rows] + shift / w  # NaN stays NaN
    return F


SCALARIZATIONS = ("weighted_sum", "worst")


def check_scalarization(how: str) -> str:
    if how not in SCALARIZATIONS:
        raise ValueError(f"optimizer.scalarize: {how!r} is not valid; use {', '.join(SCALARIZATIONS)}")
    return how


def value_note(how: str) -> str:
    """What a scalar value in a finite optimizer's summary means."""
    note = f"objectives weighted and combined by {how}, to minimize (maximized objectives negated)"
    if how == "worst":
        note += f"; ties broken by {WORST_TIE_BREAK:g} x the mean"
    return note


#: With ``scalarize: worst``, candidates whose worst objective ties are ranked by their mean, this much
#: of it: accuracies on a few hundred items tie often, and a rank-based optimizer (CMA-ES) that sees a
#: flat worst skill would otherwise drift at random instead of improving the other skills meanwhile.
WORST_TIE_BREAK = 1e-3


def scalarized(F: np.ndarray, weights: np.ndarray, how: str) -> np.ndarray:
    """One value per candidate (to minimize): the weighted sum of its objectives, or the worst
    (largest) weighted one, ties broken by the mean (``WORST_TIE_BREAK``); failed candidates (NaN)
    come out worse than every finite one."""
    weighted = Optimizer._penalize(F) * weights
    if how == "worst":
        return weighted.max(axis=1) + WORST_TIE_BREAK * weighted.mean(axis=1)
    return weighted.sum(axis=1)


class CMAES(Optimizer):
    name = "cma"

    def __init__(
        self,
        dim: int,
        n_objectives: int,
        *,
        population: int,
        seed: int,
        weights: Sequence[float] | None = None,
        sigma: float = 0.25,
        x0: Sequence[float] | None = None,
        scalarize: str = "weighted_sum",
    ):
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights)
        import cma

        self.scalarize = check_scalarization(scalarize)

        if dim < 2:
            raise ValueError("optimizer cma: needs at least 2 genes (use random or nsga2 for a 1-gene space)")
        start = np.full(dim, 0.5) if x0 is None else np.clip(np.asarray(x0, dtype=float), 0, 1)
        options = {
            "bounds": [0.0, 1.0],
            "popsize": population,
            "seed": seed + 1,  # cma treats seed 0 as "seed from the clock"
            "verbose": -9,
            "tolfun": 0.0,
            "tolx": 1e-12,
        }
        self.es = cma.CMAEvolutionStrategy(start, sigma, options)
        self._init_steady_state()

    def _init_steady_state(self) -> None:
        self._queue: list[np.ndarray] = []  # asked from es, not yet handed out by ask_one
        self._told: list[tuple[np.ndarray, np.ndarray]] = []  # results since the last update
        self._asked_since_tell = False

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_queue" not in state:  # pickled before async mode existed
            self._init_steady_state()

    def ask(self) -> np.ndarray:
        return np.clip(np.asarray(self.es.ask(), dtype=float), 0.0, 1.0)

    def scalar(self, F: np.ndarray) -> np.ndarray:
        """One value per candidate (to minimize) from its objective values."""
        return scalarized(F, self.weights, getattr(self, "scalarize", "weighted_sum"))  # old states lack it

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        scalar = self.scalar(F)
        self.es.tell([np.asarray(x) for x in X], scalar.tolist())

    def promotion_order(self, F: np.ndarray) -> np.ndarray:
        """Best first by the value CMA-ES ranks on (its scalarization), then the row."""
        scalar = self.scalar(np.atleast_2d(F))
        return np.lexsort((np.arange(len(scalar)), scalar))

    def ask_one(self) -> np.ndarray:
        if not self._queue:
            self._queue.extend(self.ask())  # a fresh population from the current distribution
            self._asked_since_tell = True
        return np.asarray(self._queue.pop(0))

    def tell_one(self, x: np.ndarray, f: np.ndarray) -> None:
        self._told.append((np.asarray(x, dtype=float), np.asarray(f, dtype=float)))
        if len(self._told) < self.population:
            return
        batch, self._told = self._told[: self.population], self._told[self.population :]
        if not self._asked_since_tell:
            self.es.ask()  # cma takes one tell per ask; happens only when nothing was asked since the last update
        self.tell(np.stack([x for x, _ in batch]), np.stack([f for _, f in batch]))
        self._asked_since_tell = False
        self._queue = []  # drawn from the old distribution: the next asks sample the updated one


class NSGA2(Optimizer):
    name = "nsga2"

    def __init__(
        self,
        dim: int,
        n_objectives: int,
        *,
        population: int,
        seed: int,
        weights: Sequence[float] | None = None,
        initial: Sequence[Sequence[float]] | None = None,
    ):
        """``initial``: points that join the first population (the rest of it is drawn uniformly), e.g.
        the hand-set merges a space can express, so the front starts from what one would set by hand."""
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights)
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.problem import Problem

        self.problem = Problem(n_var=dim, n_obj=n_objectives, xl=0.0, xu=1.0)
        if initial:
            points = np.clip(np.asarray(initial, dtype=float).reshape(-1, dim), 0.0, 1.0)
            if len(points) > population:
                raise ValueError(f"optimizer.initial: {len(points)} points do not fit a population of {population}")
            sample = np.random.default_rng(seed).random((population, dim))
            sample[: len(points)] = points
            self.algorithm = PymooNSGA2(pop_size=population, sampling=sample)
        else:
            self.algorithm = PymooNSGA2(pop_size=population)
        self.algorithm.setup(self.problem, termination=("n_gen", 10**9), seed=seed, verbose=False)
        self._asked = None
        self._init_steady_state()

    def _init_steady_state(self) -> None:
        self._steady: Any = None  # the steady-state population (pymoo Population), made by the first ask_one
        self._initial: list[np.ndarray] = []  # the initial sample, handed out first
        self._worst = np.full(self.n_objectives, -np.inf)  # per objective, the worst value told

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_steady" not in state:  # pickled before async mode existed
            self._init_steady_state()

    def ask(self) -> np.ndarray:
        asked = self.algorithm.ask()
        self._asked = asked
        return np.clip(np.asarray(asked.get("X"), dtype=np.float64), 0.0, 1.0)

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        if self._asked is None:
            raise RuntimeError("tell() without a pending ask()")
        Evaluator().eval(StaticProblem(self.problem, F=self._penalize(F)), self._asked)
        self.algorithm.tell(infills=self._asked)
        self._asked = None

    def ask_one(self) -> np.ndarray:
        from pymoo.core.population import Population

        algorithm = self.algorithm
        if self._steady is None:  # the first population: NSGA-II's own initial sampling
            initial = algorithm.initialization.do(
                self.problem, self.population, algorithm=algorithm, random_state=algorithm.random_state
            )
            self._steady = Population.empty()
            self._initial = list(np.asarray(initial.get("X"), dtype=np.float64))
        if self._initial:
            x = self._initial.pop(0)
        elif len(self._steady) < 2:  # every initial candidate asked, too few told to breed from
            x = algorithm.random_state.random(self.dim)
        else:
            offspring = algorithm.mating.do(
                self.problem, self._steady, 1, algorithm=algorithm, random_state=algorithm.random_state
            )
            x = np.asarray(offspring.get("X"), dtype=np.float64)[0]
        return np.clip(x, 0.0, 1.0)

    def tell_one(self, x: np.ndarray, f: np.ndarray) -> None:
        from pymoo.core.population import Population

        if self._steady is None:
            raise RuntimeError("tell_one() without an ask_one()")
        f = np.asarray(f, dtype=float).copy()
        worst = self._worst
        finite = np.isfinite(f)
        worst[finite] = np.maximum(worst[finite], f[finite])
        seen = np.isfinite(worst)
        # a failed candidate: worse than every value seen so far (1e6 before any)
        f[~finite] = np.where(seen, worst + 1.0 + np.abs(worst), 1e6)[~finite]
        joined = Population.merge(self._steady, Population.new(X=np.atleast_2d(x), F=np.atleast_2d(f)))
        self._steady = self.algorithm.survival.do(
            self.problem,
            joined,
            n_survive=min(self.population, len(joined)),
            algorithm=self.algorithm,
            random_state=self.algorithm.random_state,
        )


class RandomSearch(Optimizer):
    name = "random"

    def __init__(
        self, dim: int, n_objectives: int, *, population: int, seed: int, weights: Sequence[float] | None = None
    ):
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights)
        self.rng = np.random.default_rng(seed)

    def ask(self) -> np.ndarray:
        return self.rng.random((self.population, self.dim))

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        pass

    def ask_one(self) -> np.ndarray:
        return self.rng.random(self.dim)

    def tell_one(self, x: np.ndarray, f: np.ndarray) -> None:
        pass


class FiniteOptimizer(Optimizer):
    """An optimizer with a plan of known length (a grid, a soup): barrier mode only, since each step
    may depend on the whole previous one; ``ask`` returns an empty batch once it is finished."""

    def __init__(
        self,
        dim: int,
        n_objectives: int,
        *,
        population: int,
        seed: int,
        weights: Sequence[float] | None = None,
        scalarize: str = "weighted_sum",
    ):
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights)
        self.scalarize = check_scalarization(scalarize)

    def scalar(self, F: np.ndarray) -> np.ndarray:
        return scalarized(F, self.weights, self.scalarize)

    def ask_one(self) -> np.ndarray:
        raise RuntimeError(f"optimizer {self.name}: runs in optimizer.mode barrier only")

    def tell_one(self, x: np.ndarray, f: np.ndarray) -> None:
        raise RuntimeError(f"optimizer {self.name}: runs in optimizer.mode barrier only")

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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

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


SCALARIZATIONS = ("weighted_sum", "worst")


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

        if scalarize not in SCALARIZATIONS:
            raise ValueError(f"optimizer.scalarize: {scalarize!r} is not valid; use {', '.join(SCALARIZATIONS)}")
        self.scalarize = scalarize

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

    def ask(self) -> np.ndarray:
        return np.clip(np.asarray(self.es.ask(), dtype=float), 0.0, 1.0)

    def scalar(self, F: np.ndarray) -> np.ndarray:
        """One value per candidate (to minimize) from its objective values."""
        weighted = self._penalize(F) * self.weights
        worst = getattr(self, "scalarize", "weighted_sum") == "worst"  # states pickled before the option
        return weighted.max(axis=1) if worst else weighted.sum(axis=1)

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        scalar = self.scalar(F)
        self.es.tell([np.asarray(x) for x in X], scalar.tolist())


class NSGA2(Optimizer):
    name = "nsga2"

    def __init__(
        self, dim: int, n_objectives: int, *, population: int, seed: int, weights: Sequence[float] | None = None
    ):
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights)
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.problem import Problem

        self.problem = Problem(n_var=dim, n_obj=n_objectives, xl=0.0, xu=1.0)
        self.algorithm = PymooNSGA2(pop_size=population)
        self.algorithm.setup(self.problem, termination=("n_gen", 10**9), seed=seed, verbose=False)
        self._asked = None

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


OPTIMIZERS: dict[str, type[Optimizer]] = {"cma": CMAES, "nsga2": NSGA2, "random": RandomSearch}


def make_optimizer(name: str, dim: int, n_objectives: int, **options) -> Optimizer:
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer.name: {name!r} is not valid; use {', '.join(OPTIMIZERS)}") from None
    if cls is not CMAES:
        options.pop("sigma", None)
        options.pop("x0", None)
        options.pop("scalarize", None)
    return cls(dim, n_objectives, **options)

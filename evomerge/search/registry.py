"""Optimizers by name (``optimizer.name`` in a run config)."""

from __future__ import annotations

from typing import Any

from evomerge.search.gradient import Gradient
from evomerge.search.optimizers import CMAES, NSGA2, FiniteOptimizer, Optimizer, RandomSearch
from evomerge.search.soups import GreedySoup, UniformSoup
from evomerge.search.sweep import Sweep

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "cma": CMAES,
    "nsga2": NSGA2,
    "random": RandomSearch,
    "sweep": Sweep,
    "uniform_soup": UniformSoup,
    "greedy_soup": GreedySoup,
    "gradient": Gradient,
}
FINITE = tuple(name for name, cls in OPTIMIZERS.items() if issubclass(cls, FiniteOptimizer))
SOUPS = ("uniform_soup", "greedy_soup")

_OPTIONS: dict[type[Optimizer], set[str]] = {
    CMAES: {"sigma", "x0", "scalarize"},
    NSGA2: {"initial"},
    Sweep: {"scalarize", "grid"},
    UniformSoup: {"scalarize"},
    GreedySoup: {"scalarize"},
    Gradient: {"scalarize", "fit"},
}
_SPECIFIC = {"sigma", "x0", "scalarize", "grid", "initial", "fit"}


def make_optimizer(name: str, dim: int, n_objectives: int, **options: Any) -> Optimizer:
    """The optimizer ``name`` over [0,1]^dim; options it does not take (e.g. ``sigma`` for NSGA-II) are dropped."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer.name: {name!r} is not valid; use {', '.join(OPTIMIZERS)}") from None
    takes = _OPTIONS.get(cls, set())
    return cls(dim, n_objectives, **{k: v for k, v in options.items() if k not in _SPECIFIC or k in takes})

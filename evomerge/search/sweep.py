"""``optimizer.name: sweep``: a grid over one or two genes, then the argmax of a quadratic fit.

The classic way to pick a merge ratio (e.g. SLERP's ``t``, or the weight of one model against
another): score a few evenly spaced values, fit a quadratic to the scores, and take the fit's best
point inside the bounds, which is scored too. The grid covers [0,1] per gene (the space's bounds);
with two genes it is the full product grid and the fit a full quadratic in both. With too few scored
points for a fit (failed candidates), the pick is the best grid point. The sweep's ``choice`` (what
``evomerge export`` picks by default) is the better measured of the pick and the best grid point.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.optimizers import FiniteOptimizer, value_note

DEFAULT_GRID = {1: 11, 2: 5}
"""Points per gene when ``optimizer.grid`` is unset: 11 for one gene, 5 x 5 for two."""


def quadratic_features(X: np.ndarray) -> np.ndarray:
    """[1, x, x^2] for one gene; [1, x1, x2, x1^2, x1 x2, x2^2] for two."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    columns = [np.ones(len(X))] + [X[:, i] for i in range(X.shape[1])]
    columns += [X[:, i] * X[:, j] for i, j in itertools.combinations_with_replacement(range(X.shape[1]), 2)]
    return np.stack(columns, axis=1)


def fit_quadratic(X: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of the quadratic in ``quadratic_features`` through (X, values)."""
    coefficients, *_ = np.linalg.lstsq(quadratic_features(X), np.asarray(values, dtype=float), rcond=None)
    return coefficients


def fitted_argmin(coefficients: np.ndarray, dim: int, resolution: int | None = None) -> np.ndarray:
    """The point of [0,1]^dim where the fitted quadratic is lowest (a dense grid: exact to 1/resolution,
    and right also when the fit is not convex, where the best point lies on the boundary)."""
    resolution = resolution or (2001 if dim == 1 else 201)
    axis = np.linspace(0.0, 1.0, resolution)
    points = np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), axis=-1).reshape(-1, dim)
    return points[int(np.argmin(quadratic_features(points) @ coefficients))]


class Sweep(FiniteOptimizer):
    name = "sweep"

    def __init__(
        self,
        dim: int,
        n_objectives: int,
        *,
        population: int,
        seed: int,
        weights: Sequence[float] | None = None,
        scalarize: str = "weighted_sum",
        grid: int | None = None,
    ):
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights, scalarize=scalarize)
        if dim > 2:
            raise ValueError(
                f"optimizer sweep: the search space has {dim} genes; a sweep covers 1 or 2 "
                "(fix the others as plain values in the space's parameters)"
            )
        self.points_per_gene = grid or DEFAULT_GRID[dim]
        if self.points_per_gene < 3:
            raise ValueError(f"optimizer.grid: {self.points_per_gene} points per gene; a quadratic fit needs >= 3")
        axis = np.linspace(0.0, 1.0, self.points_per_gene)
        self.grid = np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), axis=-1).reshape(-1, dim)
        self.planned = len(self.grid) + 1
        self.values: np.ndarray | None = None  # the grid's scalar values (to minimize)
        self.coefficients: np.ndarray | None = None
        self.pick: np.ndarray | None = None
        self.pick_value: float | None = None
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def ask(self) -> np.ndarray:
        if self.values is None:
            return self.grid.copy()
        if self.pick is not None and not self._done:
            return self.pick[None, :].copy()
        return np.empty((0, self.dim))

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        F = np.asarray(F, dtype=float)
        if self.values is None:
            finite = np.isfinite(F).all(axis=1)
            self.values = np.where(finite, self.scalar(F), np.nan)
            if finite.sum() >= quadratic_features(self.grid[:1]).shape[1]:
                self.coefficients = fit_quadratic(self.grid[finite], self.values[finite])
                self.pick = fitted_argmin(self.coefficients, self.dim)
            else:  # too few scored points to fit: the best scored grid point (or the centre)
                self.pick = self.grid[int(np.nanargmin(self.values))] if finite.any() else np.full(self.dim, 0.5)
            return
        self.pick_value = float(self.scalar(F)[0]) if np.isfinite(F).all() else None
        self._done = True

    def summary(self) -> dict[str, Any] | None:
        if self.values is None:
            return None
        return {
            "points": [[*map(float, x), None if np.isnan(v) else float(v)] for x, v in zip(self.grid, self.values)],
            "value": value_note(self.scalarize),
            "coefficients": None if self.coefficients is None else [float(c) for c in self.coefficients],
            "pick": None if self.pick is None else [float(v) for v in self.pick],
            "pick_fitted": None
            if self.coefficients is None or self.pick is None
            else float(quadratic_features(self.pick[None, :])[0] @ self.coefficients),
            "pick_measured": self.pick_value,
            "choice": self._choice(),
        }

    def _choice(self) -> list[float] | None:
        """The better measured of the fit's pick and the best grid point (a fit can miss a sharp peak)."""
        assert self.values is not None
        if not self._done:
            return None
        best = int(np.nanargmin(self.values)) if np.isfinite(self.values).any() else None
        if self.pick is not None and self.pick_value is not None:
            if best is None or self.pick_value <= self.values[best]:
                return [float(v) for v in self.pick]
        return None if best is None else [float(v) for v in self.grid[best]]

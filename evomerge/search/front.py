"""Pareto front, hypervolume and the best candidate, from a run's records.

Values are handled as "to minimize" internally (maximized objectives negated), so one dominance test
and pymoo's hypervolume indicator serve every mix of directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def to_minimize(values: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(directions)) * sign


def pareto_indices(F: np.ndarray) -> list[int]:
    """Indices of the non-dominated rows of F (minimization); duplicates keep their first occurrence."""
    F = np.asarray(F, dtype=float)
    keep: list[int] = []
    for i in range(len(F)):
        dominated = np.any(np.all(F <= F[i], axis=1) & np.any(F < F[i], axis=1))
        duplicate = any(np.array_equal(F[i], F[j]) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    return keep


def reference_point(directions: Sequence[str], references: Sequence[float | None], F: np.ndarray) -> np.ndarray:
    """Per objective: the configured reference, else 0 for maximized metrics (accuracies), else the
    worst observed value (minimization space)."""
    ref = []
    for j, (direction, given) in enumerate(zip(directions, references)):
        if given is not None:
            ref.append(-given if direction == "maximize" else given)
        elif direction == "maximize":
            ref.append(0.0)
        else:
            ref.append(float(F[:, j].max()) if len(F) else 0.0)
    return np.asarray(ref)


def hypervolume(F: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume dominated by F (minimization) up to ``ref`` (pymoo's exact indicator)."""
    from pymoo.indicators.hv import HV

    F = np.asarray(F, dtype=float)
    inside = F[np.all(F < ref, axis=1)] if len(F) else F
    if len(inside) == 0:
        return 0.0
    return float(HV(ref_point=ref)(inside))


def weighted_score(values: Sequence[float], directions: Sequence[str], weights: Sequence[float]) -> float:
    """The single number CMA-ES optimizes (higher is better): sum of weight * value, minimized ones negated."""
    return float(sum(w * (v if d == "maximize" else -v) for v, d, w in zip(values, directions, weights)))

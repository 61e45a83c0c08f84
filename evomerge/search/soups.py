"""Model soups (Wortsman et al. 2022) as optimizers: ``uniform_soup`` and ``greedy_soup``.

A soup averages checkpoints of one model fine-tuned several ways (seeds, data orders,
hyper-parameters). Its search space is a ``linear`` merge with one ``weight`` gene per checkpoint,
bounds [0, high]: a soup of a subset S of the pool is the candidate whose genes are 1 for S and 0
elsewhere, i.e. the uniform average of S (``linear`` normalizes the weights). Exported, it is an
ordinary mergekit ``linear`` recipe.

- ``uniform_soup``: every ingredient alone and the average of all, in one batch (n + 1 candidates),
  so the report shows the soup next to its best ingredient.
- ``greedy_soup``: every ingredient alone; then, best first, each next ingredient joins the soup
  only if the soup's score does not drop (2n - 1 candidates, the additions one at a time).

Both rank by the scalarized objectives (``optimizer.scalarize``), as CMA-ES does. Their ``choice``
(what ``evomerge export`` picks by default) is the soup they end with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.optimizers import FiniteOptimizer, value_note
from evomerge.search.space import Bounds, ParameterSpace, SearchSpace


def check_soup_space(space: SearchSpace, optimizer: str) -> None:
    """Refuse a space whose genes are not one averaging weight per checkpoint (the message names the field)."""
    where = f"optimizer {optimizer}: the search space"
    if not isinstance(space, ParameterSpace):
        raise ValueError(f"{where} must be kind: ps (a linear merge of the pool), not {space.kind}")
    if space.methods != ["linear"]:
        raise ValueError(f"{where}'s method must be linear (a soup is an average), got {space.method!r}")
    if len(space.models) < 2:
        raise ValueError(f"{where}'s models: a soup needs >= 2 checkpoints, got {len(space.models)}")
    if space.granularity != "model" or space.split_attn_mlp or space.split_modules:
        raise ValueError(
            f"{where}: granularity must be model, split_attn_mlp and split_modules false (one weight per checkpoint)"
        )
    if space.normalize not in (None, True):
        raise ValueError(f"{where}: normalize must be true or unset (a soup is a normalized average)")
    weight = space.parameters.get("weight")
    searched = {k for k, v in space.parameters.items() if isinstance(v, Bounds)}
    if not isinstance(weight, Bounds) or weight.low != 0 or weight.high <= 0 or searched != {"weight"}:
        raise ValueError(
            f"{where}'s parameters must be exactly weight: {{low: 0, high: 1}} (0 leaves a checkpoint out), "
            f"got {dict(space.parameters)}"
        )


def soup_genes(members: Sequence[int], size: int) -> np.ndarray:
    """The genes of the uniform soup of ``members`` (indices into the pool)."""
    x = np.zeros(size)
    x[list(members)] = 1.0
    return x


class UniformSoup(FiniteOptimizer):
    name = "uniform_soup"

    def __init__(self, dim: int, n_objectives: int, **options: Any):
        super().__init__(dim, n_objectives, **options)
        self.planned = dim + 1
        self.values: np.ndarray | None = None

    @property
    def finished(self) -> bool:
        return self.values is not None

    def ask(self) -> np.ndarray:
        if self.finished:
            return np.empty((0, self.dim))
        return np.stack([*(soup_genes([i], self.dim) for i in range(self.dim)), np.ones(self.dim)])

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        self.values = np.where(np.isfinite(F).all(axis=1), self.scalar(F), np.nan)

    def summary(self) -> dict[str, Any] | None:
        if self.values is None:
            return None
        singles, soup = self.values[:-1], self.values[-1]
        best = int(np.nanargmin(singles)) if np.isfinite(singles).any() else None
        return {
            "value": value_note(self.scalarize),
            "ingredients": [_number(v) for v in singles],
            "soup": list(range(self.dim)),
            "soup_value": _number(soup),
            "choice": [1.0] * self.dim,
            "best_ingredient": best,
            "soup_at_least_best_ingredient": bool(best is not None and soup <= singles[best]),
        }


class GreedySoup(FiniteOptimizer):
    name = "greedy_soup"

    def __init__(self, dim: int, n_objectives: int, **options: Any):
        super().__init__(dim, n_objectives, **options)
        self.planned = 2 * dim - 1
        self.singles: np.ndarray | None = None
        self.order: list[int] = []  # the pool, best ingredient first
        self.soup: list[int] = []
        self.soup_value = np.inf
        self.steps: list[dict[str, Any]] = []  # per tried addition: the ingredient, the value, kept or not

    @property
    def finished(self) -> bool:
        return self.singles is not None and len(self.steps) == self.dim - 1

    def ask(self) -> np.ndarray:
        if self.singles is None:
            return np.eye(self.dim)
        if self.finished:
            return np.empty((0, self.dim))
        candidate = self.order[len(self.steps) + 1]
        return soup_genes([*self.soup, candidate], self.dim)[None, :]

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        values = self.scalar(F)  # failed candidates: worse than every finite one
        if self.singles is None:
            self.singles = np.where(np.isfinite(F).all(axis=1), values, np.nan)
            self.order = [int(i) for i in np.argsort(values, kind="stable")]
            self.soup = [self.order[0]]
            self.soup_value = float(values[self.order[0]])
            return
        failed = not np.isfinite(F).all()
        value = float(values[0])
        candidate = self.order[len(self.steps) + 1]
        kept = not failed and value <= self.soup_value  # "does not drop": ties join
        if kept:
            self.soup.append(candidate)
            self.soup_value = value
        self.steps.append({"ingredient": candidate, "value": None if failed else value, "kept": kept})

    def summary(self) -> dict[str, Any] | None:
        if self.singles is None:
            return None
        return {
            "value": value_note(self.scalarize),
            "ingredients": [_number(v) for v in self.singles],
            "order": self.order,
            "steps": self.steps,
            "soup": sorted(self.soup),
            "soup_value": _number(self.soup_value),
            "choice": soup_genes(self.soup, self.dim).tolist(),
        }


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None

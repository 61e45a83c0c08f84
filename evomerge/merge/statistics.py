"""Per-model statistics that data-aware methods (fisher, regmean) read next to the weights.

A statistics file is a safetensors file holding, under a model's tensor names, what its
``Statistic`` says (the diagonal Fisher of a parameter; the input Gram matrix of a linear layer's
weight). They are computed from data by ``evomerge.eval.statistics`` (which runs the model on task
items) and handed to the merge as paths, so the merge engine itself never runs a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from evomerge.recipe import Recipe

StatisticsProvider = Callable[[Recipe], Mapping[str, Path]]
"""Given a data-aware recipe (model references resolved), the statistics file of each of its models."""


class StatisticsFile:
    """One model's statistics, read lazily tensor by tensor (memory-mapped by safetensors)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: statistics file does not exist")
        self._file = safe_open(str(self.path), framework="pt")
        self.names = set(self._file.keys())
        self.metadata = dict(self._file.metadata() or {})

    def get(self, name: str) -> torch.Tensor | None:
        """The statistic of tensor ``name``, or ``None`` when the model has none for it."""
        return self._file.get_tensor(name) if name in self.names else None

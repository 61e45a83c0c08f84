"""Adapter merges: several PEFT LoRA adapters of one base combined into one LoRA adapter.

The combination types are PEFT's ``LoraModel.add_weighted_adapter`` (``linear``, ``cat``, ``svd``,
``ties``, ``ties_svd``, ``dare_linear``, ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``,
``magnitude_prune``, ``magnitude_prune_svd``), with its parameter names; the result is a PEFT adapter
directory that ``PeftModel.from_pretrained`` loads, equal to PEFT's own result on the same inputs.
mergekit has no adapter-to-adapter merge, so this is evomerge's own YAML (``evomerge merge`` tells the
two kinds of file apart by ``adapter_merge:``)::

    adapter_merge: svd
    base_model: zoo/models/base
    adapters:
      - {adapter: zoo/adapters/latin, weight: 1.0}
      - {adapter: zoo/adapters/greek, weight: 1.0}
    svd_rank: 8

A LoRA adapter is usable as a *model* anywhere a recipe names one, as mergekit writes it:
``BASE_DIR+ADAPTER_DIR`` (the base with the adapter merged in).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Combination = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
COMBINATIONS: tuple[str, ...] = get_args(Combination)
"""PEFT's ``add_weighted_adapter`` combination types."""

NEEDS_DENSITY = frozenset(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude_prune")))
RANDOMIZED = frozenset(c for c in COMBINATIONS if c.startswith("dare"))
SAME_RANK = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
"""Combinations that mix the A and B matrices themselves, so every adapter needs the same rank."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightedAdapter(_Strict):
    adapter: str
    """A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)."""
    weight: float = 1.0


class AdapterMerge(_Strict):
    """``adapter_merge:`` YAML: which adapters, how combined (PEFT's ``add_weighted_adapter`` arguments)."""

    adapter_merge: Combination
    base_model: str
    """The model every adapter was trained on (its module names and shapes)."""
    adapters: list[WeightedAdapter] = Field(min_length=1)
    svd_rank: int | None = Field(default=None, gt=0)
    """svd variants: the rank of the result (default: the largest of the adapters' ranks)."""
    svd_clamp: float | None = Field(default=None, gt=0, le=1)
    """svd variants: a quantile at which the factors are clamped (default: none)."""
    density: float | None = Field(default=None, ge=0, le=1)
    """ties, dare and magnitude_prune variants: the share of entries kept."""
    majority_sign_method: Literal["total", "frequency"] = "total"

    @model_validator(mode="after")
    def _check(self) -> AdapterMerge:
        if self.adapter_merge in NEEDS_DENSITY and self.density is None and len(self.adapters) > 1:
            raise ValueError(f"density: adapter_merge {self.adapter_merge!r} needs a density in [0, 1]")
        if self.svd_rank is not None and not self.adapter_merge.endswith("svd"):
            raise ValueError(f"svd_rank: only the svd variants take it, not {self.adapter_merge!r}")
        return self

    @property
    def combination(self) -> str:
        """What PEFT runs: with one adapter, ``linear`` whatever was asked (as ``add_weighted_adapter`` does)."""
        return "linear" if len(self.adapters) == 1 else self.adapter_merge

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "adapter merge") -> AdapterMerge:
        from evomerge.recipe.schema import RecipeError, _describe

        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise RecipeError(f"{source}: {_describe(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> AdapterMerge:
        from evomerge.recipe.schema import RecipeError, read_yaml

        data = read_yaml(path)
        if not isinstance(data, Mapping):
            raise RecipeError(f"{path}: expected a mapping with adapter_merge, base_model and adapters")
        return cls.from_dict(data, source=str(path))


def is_adapter_merge(path: str | Path) -> bool:
    """Whether a YAML file is an adapter merge (``adapter_merge:``) rather than a mergekit recipe."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, Mapping) and "adapter_merge" in data


def split_adapter_ref(ref: str) -> tuple[str, str] | None:
    """``BASE+ADAPTER`` (mergekit's syntax for a base with a LoRA merged in) -> (base, adapter), else None."""
    if "+" not in ref or Path(ref).exists():
        return None
    base, adapter = ref.split("+", 1)
    return (base, adapter) if base and adapter else None

"""Search spaces (``search_spaces/*.yaml``): what may vary between candidates, and within which bounds.

``genome.py`` turns a space into a genome (x in [0,1]^d -> Recipe). Two kinds of space:

- **Parameter space (PS)**: which merge parameters are searched, their bounds and granularity (one
  value per model, per block of k layers, or per layer; optionally separate attention and MLP values),
  the method (fixed, or a categorical gene over methods) and ``normalize`` (fixed or a gene). A
  candidate is one ``models:`` recipe; per-layer values are written as mergekit gradient lists with
  one entry per layer, which mergekit evaluates exactly at each layer.
- **Data-flow space (DFS)** (Akiba et al. 2024): the slots are the layers of the source models
  repeated ``repeats`` times; per slot one gene says whether it is on the path and one its input
  scale. A path is decoded to a routing, hence to an ordinary passthrough recipe
  (``merge/routing.py``). Paths with no layers, or longer than ``max_path_length``, are repaired by
  the decoder (the slots with the strongest inclusion genes win), never sent to a worker.
- **Mixture-of-experts space (MoE)**: candidate experts (dense models whose MLPs become experts) with a
  pool of router prompts each; genes choose which experts are in (at least ``experts_per_token``), which
  of each expert's prompts set its router (at least one), and, when given as lists, the base model,
  the gate mode and the experts per token. A candidate is a mergekit-moe config (``recipe/moe.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.recipe import BOOL_PARAMS, DataSection
from evomerge.recipe.methods import REQUIRED, get_method


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bounds(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Bounds":
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"bounds must be finite with low <= high, got [{self.low}, {self.high}]")
        return self

    def scale(self, x: float) -> float:
        return self.low + float(x) * (self.high - self.low)

    def unscale(self, value: float) -> float:
        span = self.high - self.low
        return 0.5 if span == 0 else float(np.clip((value - self.low) / span, 0.0, 1.0))


class ParameterSpace(_Strict):
    """PS: per-model merge parameters."""

    kind: Literal["ps"] = "ps"
    models: list[str] = Field(min_length=1)
    base_model: str | None = None
    method: Union[str, list[str]]
    """A method name, or a list of names to search over (a categorical gene)."""
    parameters: dict[str, Union[Bounds, float, bool]]
    """Searched parameters as ``{low, high}``; fixed ones as plain values."""
    granularity: Union[Literal["model", "layer"], int] = "model"
    """``model``: one value per model; ``layer``: one per layer; an integer k: one per block of k layers."""
    split_attn_mlp: bool = False
    """Separate values for attention tensors and for the rest (MLP, norms, embeddings)."""
    split_modules: bool = False
    """Separate values for each projection of a Llama-style layer (``MODULE_PARTS``: q/k/v/o_proj,
    gate/up/down_proj) and for the rest (norms; embeddings and head take layer 0's value)."""
    normalize: Union[bool, Literal["search"], None] = None
    """Fixed true/false, ``search`` (a gene), or unset (the method's default)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    data: DataSection | None = None
    """Data-aware methods (fisher, regmean): the items their statistics come from, as a recipe's
    ``data:``; default: the run's objectives (their tasks, splits and item limits)."""

    @model_validator(mode="after")
    def _check(self) -> "ParameterSpace":
        methods = self.methods
        if isinstance(self.granularity, int) and self.granularity < 1:
            raise ValueError("granularity: a block size must be >= 1")
        if self.split_attn_mlp and self.split_modules:
            raise ValueError("split_modules: give it or split_attn_mlp, not both (modules already split attention)")
        for name in methods:
            spec = get_method(name)
            if spec.uses_base and not self.base_model:
                raise ValueError(f"base_model: method {name!r} needs a base model")
            for key, default in spec.model_params.items():
                if default is REQUIRED and key not in self.parameters:
                    raise ValueError(f"parameters.{key}: method {name!r} needs it; give bounds or a fixed value")
        known = {k for m in methods for k in (*get_method(m).params, *get_method(m).model_params)}
        for key, value in self.parameters.items():
            if key not in known:
                raise ValueError(
                    f"parameters.{key}: not a parameter of {', '.join(methods)} (valid: {', '.join(sorted(known))})"
                )
            if key in BOOL_PARAMS and isinstance(value, Bounds):
                raise ValueError(f"parameters.{key}: a true/false parameter cannot have bounds")
            if key == "normalize":
                raise ValueError("parameters.normalize: use the top-level 'normalize' field (true, false or search)")
        if self.data is not None and not self.data_aware:
            raise ValueError(f"data: only data-aware methods (fisher, regmean) read data, not {', '.join(methods)}")
        return self

    @property
    def data_aware(self) -> bool:
        """Whether some method of the space reads statistics computed from data."""
        return any(get_method(m).statistic is not None for m in self.methods)

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)


class DataFlowSpace(_Strict):
    """DFS: layer routings over the source models' layers, repeated ``repeats`` times."""

    kind: Literal["dfs"] = "dfs"
    models: list[str] = Field(min_length=1)
    repeats: int = Field(default=2, ge=1)
    max_path_length: int | None = Field(default=None, ge=1)
    """Default: twice the layer count of one model."""
    min_path_length: int = Field(default=1, ge=1)
    scale: Bounds = Bounds(low=0.5, high=2.0)
    """Input scale per hop, searched log-uniformly between the bounds (both > 0)."""
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """PS+DFS: earlier stages usable as models by name, ``{run: RUN_DIR, pick: knee}`` or ``{recipe: FILE}``."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> "DataFlowSpace":
        if self.scale.low <= 0:
            raise ValueError("scale.low: scales must be > 0")
        if self.max_path_length is not None and self.max_path_length < self.min_path_length:
            raise ValueError("max_path_length: must be >= min_path_length")
        return self


class MoEExpert(_Strict):
    """A candidate expert and the pool of prompts its router may be set from."""

    source_model: str
    positive_prompts: list[str] = Field(min_length=1)


class MoESpace(_Strict):
    """MoE: mixtures of the candidate experts (mergekit-moe configs)."""

    kind: Literal["moe"] = "moe"
    base_model: list[str] = Field(min_length=1)
    """Where attention, embeddings and norms come from; more than one: a gene chooses."""
    experts: list[MoEExpert] = Field(min_length=2)
    gate_mode: list[Literal["hidden", "cheap_embed"]] = Field(default=["hidden"], min_length=1)
    experts_per_token: list[int] = Field(default=[1], min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Merges usable as ``base_model`` by name ("MoE from merged models"), as in a DFS space:
    ``{run: RUN_DIR, pick: knee}`` or ``{recipe: FILE}``; merged once into the stage cache."""

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, data: Any) -> Any:
        """A single value where a list of choices is expected is a list of one (fixed, no gene)."""
        if isinstance(data, Mapping):
            data = dict(data)
            for key in ("base_model", "gate_mode", "experts_per_token"):
                if key in data and not isinstance(data[key], list):
                    data[key] = [data[key]]
        return data

    @model_validator(mode="after")
    def _check(self) -> "MoESpace":
        for k in self.experts_per_token:
            if not 1 <= k <= len(self.experts):
                raise ValueError(f"experts_per_token: {k} is not in 1..{len(self.experts)} (the experts given)")
        owner: dict[str, int] = {}
        for i, expert in enumerate(self.experts):  # else two experts could be given the same router prompts
            for prompt in expert.positive_prompts:
                if owner.setdefault(prompt, i) != i:
                    raise ValueError(
                        f"experts[{i}].positive_prompts: {prompt!r} is also in experts[{owner[prompt]}]'s pool; "
                        "each expert's prompts must be its own"
                    )
        return self


SearchSpace = Union[ParameterSpace, DataFlowSpace, MoESpace]


def load_space(data: Mapping[str, Any] | str | Path, *, source: str = "search space") -> SearchSpace:
    """Parse a search space from a mapping or a YAML file."""
    import yaml
    from pydantic import ValidationError

    from evomerge.recipe import _describe

    if isinstance(data, (str, Path)):
        source = str(data)
        try:
            data = yaml.safe_load(Path(data).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpaceError(f"{source}: cannot read: {exc}") from None
    if not isinstance(data, Mapping):
        raise SpaceError(f"{source}: expected a mapping with kind: ps, dfs or moe")
    kind = data.get("kind", "ps")
    if kind not in ("ps", "dfs", "moe"):
        raise SpaceError(f"{source}: kind: {kind!r} is not valid; use ps, dfs or moe")
    try:
        if kind == "ps":
            return ParameterSpace.model_validate(dict(data))
        if kind == "moe":
            return MoESpace.model_validate(dict(data))
        return DataFlowSpace.model_validate(dict(data))
    except ValidationError as exc:
        raise SpaceError(f"{source}: {_describe(exc)}") from None
    except ValueError as exc:
        raise SpaceError(f"{source}: {exc}") from None

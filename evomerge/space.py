"""Search spaces and the Genome: x in [0,1]^d -> Recipe. Only this module knows the encoding.

Two kinds of space (``search_spaces/*.yaml``):

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
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.merge.methods import REQUIRED, get_method
from evomerge.merge.routing import Hop, check_foldable, recipe_to_routing, routing_to_recipe
from evomerge.recipe import BOOL_PARAMS, Recipe, evaluate_setting


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
    normalize: Union[bool, Literal["search"], None] = None
    """Fixed true/false, ``search`` (a gene), or unset (the method's default)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> "ParameterSpace":
        methods = self.methods
        if isinstance(self.granularity, int) and self.granularity < 1:
            raise ValueError("granularity: a block size must be >= 1")
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
                raise ValueError(f"parameters.{key}: not a parameter of {', '.join(methods)} (valid: {', '.join(sorted(known))})")
            if key in BOOL_PARAMS and isinstance(value, Bounds):
                raise ValueError(f"parameters.{key}: a true/false parameter cannot have bounds")
            if key == "normalize":
                raise ValueError("parameters.normalize: use the top-level 'normalize' field (true, false or search)")
        return self

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


SearchSpace = Union[ParameterSpace, DataFlowSpace]


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
        raise SpaceError(f"{source}: expected a mapping with kind: ps or dfs")
    kind = data.get("kind", "ps")
    model = {"ps": ParameterSpace, "dfs": DataFlowSpace}.get(kind)
    if model is None:
        raise SpaceError(f"{source}: kind: {kind!r} is not valid; use ps or dfs")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise SpaceError(f"{source}: {_describe(exc)}") from None
    except ValueError as exc:
        raise SpaceError(f"{source}: {exc}") from None


# --- the genome --------------------------------------------------------------------------------


def _num_layers(model: str) -> int:
    path = Path(model) / "config.json"
    try:
        return int(json.loads(path.read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError) as exc:
        raise SpaceError(f"{model}: cannot read the layer count from {path} ({exc})") from None


class Genome:
    """Maps x in [0,1]^d to a Recipe (and back, where a recipe comes from this space)."""

    def __init__(self, space: SearchSpace, *, num_layers: int | None = None):
        self.space = space
        if isinstance(space, ParameterSpace):
            self.num_layers = num_layers or _num_layers(space.base_model or space.models[0])
            self._build_ps(space)
        else:
            counts = {m: (num_layers or _num_layers(m)) for m in space.models}
            if len(set(counts.values())) != 1:
                raise SpaceError(f"models: layer counts differ ({counts}); DFS needs models of one depth")
            self.num_layers = next(iter(counts.values()))
            if num_layers is None:
                for model in space.models:
                    check_foldable(json.loads((Path(model) / "config.json").read_text()), model)
            self._build_dfs(space)

    # --- layout ------------------------------------------------------------------------------------
    def _groups(self) -> list[list[int]]:
        """Layer indices per group, by granularity (the last block may be shorter)."""
        space = self.space
        assert isinstance(space, ParameterSpace)
        layers = list(range(self.num_layers))
        if space.granularity == "model":
            return [layers]
        size = 1 if space.granularity == "layer" else int(space.granularity)
        return [layers[i: i + size] for i in range(0, len(layers), size)]

    def _build_ps(self, space: ParameterSpace) -> None:
        self.groups = self._groups()
        self.parts = ("attn", "rest") if space.split_attn_mlp else ("all",)
        self.names: list[str] = []
        if len(space.methods) > 1:
            self.names.append("method")
        if space.normalize == "search":
            self.names.append("normalize")
        self.searched = [k for k, v in space.parameters.items() if isinstance(v, Bounds)]
        self._param_slots: dict[tuple[str, str, int, str], int] = {}
        for key in self.searched:
            for model in space.models:
                for g in range(len(self.groups)):
                    for part in self.parts:
                        self._param_slots[(key, model, g, part)] = len(self.names)
                        self.names.append(f"{key}[{_short(model)}][g{g}]" + ("" if part == "all" else f"[{part}]"))
        if not self.names:
            raise SpaceError("the space has no genes: give at least one parameter bounds, or several methods")

    def _build_dfs(self, space: DataFlowSpace) -> None:
        self.slots = [
            (model, layer)
            for _ in range(space.repeats)
            for model in space.models
            for layer in range(self.num_layers)
        ]
        self.max_path = space.max_path_length or 2 * self.num_layers
        self.min_path = min(space.min_path_length, len(self.slots))
        n = len(self.slots)
        self.names = [f"use[{i}]" for i in range(n)] + [f"scale[{i}]" for i in range(n)]

    @property
    def dim(self) -> int:
        return len(self.names)

    # --- decoding ----------------------------------------------------------------------------------
    def decode(self, x: Sequence[float] | np.ndarray) -> Recipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {self.dim} genes, got an array of shape {x.shape}")
        if isinstance(self.space, ParameterSpace):
            return self._decode_ps(x)
        return routing_to_recipe(self.decode_path(x), dtype=self.space.dtype, check=False)

    def _method_of(self, x: np.ndarray) -> str:
        methods = self.space.methods  # type: ignore[union-attr]
        if len(methods) == 1:
            return methods[0]
        return methods[min(int(x[self.names.index("method")] * len(methods)), len(methods) - 1)]

    def _decode_ps(self, x: np.ndarray) -> Recipe:
        space = self.space
        assert isinstance(space, ParameterSpace)
        method = self._method_of(x)
        spec = get_method(method)
        takes = set(spec.params) | set(spec.model_params)
        models = []
        for model in space.models:
            params: dict[str, Any] = {}
            for key in spec.model_params:
                if key not in space.parameters:
                    continue
                value = space.parameters[key]
                params[key] = self._setting(x, key, model) if isinstance(value, Bounds) else value
            entry: dict[str, Any] = {"model": model}
            if params:
                entry["parameters"] = params
            models.append(entry)
        top: dict[str, Any] = {}
        for key in spec.params:
            if key in space.parameters and key in takes:
                value = space.parameters[key]
                top[key] = self._setting(x, key, space.models[0]) if isinstance(value, Bounds) else value
        if "normalize" in spec.params:
            if space.normalize == "search":
                top["normalize"] = bool(x[self.names.index("normalize")] >= 0.5)
            elif space.normalize is not None:
                top["normalize"] = space.normalize
        recipe: dict[str, Any] = {"merge_method": method, "models": models, "dtype": space.dtype}
        if space.base_model and (spec.uses_base or spec.optional_base):
            recipe["base_model"] = space.base_model
        if top:
            recipe["parameters"] = top
        return Recipe.from_dict(recipe, source="genome")

    def _setting(self, x: np.ndarray, key: str, model: str) -> Any:
        bounds = self.space.parameters[key]  # type: ignore[union-attr]
        per_part = {}
        for part in self.parts:
            values = [bounds.scale(x[self._param_slots[(key, model, g, part)]]) for g in range(len(self.groups))]
            per_part[part] = [round(values[g], 6) for g, group in enumerate(self.groups) for _ in group]
        def compact(values: list[float]) -> Any:
            return values[0] if len(set(values)) == 1 else values
        if self.parts == ("all",):
            return compact(per_part["all"])
        return [{"filter": "self_attn", "value": compact(per_part["attn"])}, {"value": compact(per_part["rest"])}]

    def decode_path(self, x: Sequence[float] | np.ndarray) -> list[Hop]:
        """DFS: the routing a genome encodes, repaired to a valid length."""
        space = self.space
        assert isinstance(space, DataFlowSpace)
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        n = len(self.slots)
        use, scale = x[:n], x[n:]
        chosen = [i for i in range(n) if use[i] > 0.5]
        strongest = sorted(range(n), key=lambda i: (-use[i], i))
        if len(chosen) < self.min_path:
            chosen = sorted(set(chosen) | set([i for i in strongest if i not in chosen][: self.min_path - len(chosen)]))
        if len(chosen) > self.max_path:
            keep = set(sorted(chosen, key=lambda i: (-use[i], i))[: self.max_path])
            chosen = [i for i in chosen if i in keep]
        low, high = space.scale.low, space.scale.high
        return [
            Hop(self.slots[i][0], self.slots[i][1], round(float(low * (high / low) ** scale[i]), 6))
            for i in chosen
        ]

    # --- encoding ----------------------------------------------------------------------------------
    def encode(self, recipe: Recipe) -> np.ndarray | None:
        """The genes of a recipe this genome can produce (None if it cannot express it)."""
        if isinstance(self.space, DataFlowSpace):
            return self._encode_dfs(recipe)
        return self._encode_ps(recipe)

    def _encode_ps(self, recipe: Recipe) -> np.ndarray | None:
        space = self.space
        assert isinstance(space, ParameterSpace)
        if recipe.merge_method not in space.methods or recipe.models is None:
            return None
        if [m.model for m in recipe.models] != space.models:
            return None
        x = np.full(self.dim, 0.5)
        if "method" in self.names:
            index = space.methods.index(recipe.merge_method)
            x[self.names.index("method")] = (index + 0.5) / len(space.methods)
        if "normalize" in self.names:
            x[self.names.index("normalize")] = 1.0 if (recipe.parameters or {}).get("normalize") else 0.0
        for (key, model, g, part), slot in self._param_slots.items():
            entry = next(m for m in recipe.models if m.model == model)
            setting = (entry.parameters or {}).get(key, (recipe.parameters or {}).get(key))
            if setting is None:
                continue
            layer = self.groups[g][0]
            t = layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
            name = "self_attn" if part == "attn" else "mlp"
            value = evaluate_setting(setting, f"model.layers.{layer}.{name}.x.weight", t)
            x[slot] = space.parameters[key].unscale(float(value))  # type: ignore[union-attr]
        return x

    def _encode_dfs(self, recipe: Recipe) -> np.ndarray | None:
        space = self.space
        assert isinstance(space, DataFlowSpace)
        hops = recipe_to_routing(recipe)
        if hops is None:
            return None
        n = len(self.slots)
        x = np.zeros(2 * n)
        x[n:] = 0.5
        cursor = 0
        low, high = space.scale.low, space.scale.high
        for hop in hops:
            while cursor < n and self.slots[cursor] != (hop.model, hop.layer):
                cursor += 1
            if cursor == n or not low <= hop.scale <= high:
                return None
            x[cursor] = 1.0
            x[n + cursor] = 0.5 if high == low else math.log(hop.scale / low) / math.log(high / low)
            cursor += 1
        return x


def _short(model: str) -> str:
    return Path(model).name or model


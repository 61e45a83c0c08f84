"""Genomes: x in [0,1]^d <-> Recipe. Only this module knows how a space is encoded.

Optimizers see a box [0,1]^d; a genome names its d genes, decodes a point to a recipe and encodes a
recipe (one this space can produce) back to a point, e.g. to start a search at a hand-set merge.

- ``PSGenome`` (parameter space): one gene per searched parameter, per model for per-model parameters
  (``weight``, ``density``) and once for global ones (``t``, ``lambda``), per layer group and, with
  ``split_attn_mlp`` or ``split_modules``, per part (mergekit filters on the tensor names); plus a categorical gene for the method and one for ``normalize``
  where searched. Per-layer values are written as mergekit gradient lists with one entry per layer,
  which mergekit evaluates exactly at each layer.
- ``DFSGenome`` (data-flow space, Akiba et al. 2024): per slot (a source layer, repeated ``repeats``
  times) one gene says whether it is on the path and one its input scale. Paths with no layers, or
  longer than ``max_path_length``, are repaired here (the slots with the strongest inclusion genes
  win), never sent to a worker.
- ``MoEGenome`` (mixture of experts): one gene per candidate expert (in when >= 0.5; the strongest
  ones are kept when fewer than the experts per token are), one per prompt in each expert's pool
  (in when >= 0.5; the strongest one when none is), and a categorical gene for each of base model,
  gate mode and experts per token that has more than one choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evomerge.merge.routing import Hop, check_foldable, recipe_to_routing, routing_to_recipe
from evomerge.recipe import MoEConfig, Recipe, evaluate_setting
from evomerge.recipe.methods import get_method
from evomerge.search.space import Bounds, DataFlowSpace, MoESpace, ParameterSpace, SearchSpace, SpaceError


class Genome(Protocol):
    """What the search needs from an encoding."""

    @property
    def dim(self) -> int: ...

    @property
    def names(self) -> list[str]: ...

    def decode(self, x: Sequence[float] | np.ndarray) -> Any: ...

    def encode(self, recipe: Any) -> np.ndarray | None: ...


MODULE_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The parts of ``split_modules``: the projections of a Llama-style decoder layer, by tensor name."""


def make_genome(space: SearchSpace, *, num_layers: int | None = None) -> PSGenome | DFSGenome | MoEGenome:
    """The genome of a space; ``num_layers`` skips reading it from the models' config.json (tests)."""
    if isinstance(space, ParameterSpace):
        return PSGenome(space, num_layers=num_layers)
    if isinstance(space, MoESpace):
        return MoEGenome(space)
    return DFSGenome(space, num_layers=num_layers)


def _num_layers(model: str) -> int:
    path = Path(model) / "config.json"
    try:
        return int(json.loads(path.read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError) as exc:
        raise SpaceError(f"{model}: cannot read the layer count from {path} ({exc})") from None


def _clip(x: Sequence[float] | np.ndarray, dim: int) -> np.ndarray:
    genes = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    if genes.shape != (dim,):
        raise ValueError(f"genome has {dim} genes, got an array of shape {genes.shape}")
    return genes


def _short(model: str) -> str:
    return Path(model).name or model


class _Genes:
    """The gene names a genome defines (``names``) and their count (``dim``)."""

    _names: list[str]

    @property
    def names(self) -> list[str]:
        return self._names

    @property
    def dim(self) -> int:
        return len(self._names)


class PSGenome(_Genes):
    """Parameter space: merge parameters per model (or global), per layer group and part."""

    def __init__(self, space: ParameterSpace, *, num_layers: int | None = None):
        self.space = space
        self.num_layers = num_layers or _num_layers(space.base_model or space.models[0])
        layers = list(range(self.num_layers))
        if space.granularity == "model":
            self.groups = [layers]
        else:
            size = 1 if space.granularity == "layer" else int(space.granularity)
            self.groups = [layers[i : i + size] for i in range(0, len(layers), size)]
        self.parts: tuple[str, ...] = ("all",)
        if space.split_attn_mlp:
            self.parts = ("attn", "rest")
        elif space.split_modules:
            self.parts = (*MODULE_PARTS, "rest")
        self._names: list[str] = []
        if len(space.methods) > 1:
            self._names.append("method")
        if space.normalize == "search":
            self._names.append("normalize")
        self.searched = [k for k, v in space.parameters.items() if isinstance(v, Bounds)]
        per_model = {k for m in space.methods for k in get_method(m).model_params}
        #: (parameter, model or None for a global parameter, group, part) -> gene index
        self._slots: dict[tuple[str, str | None, int, str], int] = {}
        for key in self.searched:
            owners: list[str | None] = list(space.models) if key in per_model else [None]
            for model in owners:
                for g in range(len(self.groups)):
                    for part in self.parts:
                        self._slots[(key, model, g, part)] = len(self._names)
                        who = "" if model is None else f"[{_short(model)}]"
                        self._names.append(f"{key}{who}[g{g}]" + ("" if part == "all" else f"[{part}]"))
        if not self._names:
            raise SpaceError("the space has no genes: give at least one parameter bounds, or several methods")

    # --- decoding ----------------------------------------------------------------------------------
    def decode(self, x: Sequence[float] | np.ndarray) -> Recipe:
        x = _clip(x, self.dim)
        space = self.space
        method = self._method_of(x)
        spec = get_method(method)
        models = []
        for model in space.models:
            params: dict[str, Any] = {}
            for key in spec.model_params:
                if key in space.parameters:
                    value = space.parameters[key]
                    params[key] = self._setting(x, key, model) if isinstance(value, Bounds) else value
            entry: dict[str, Any] = {"model": model}
            if params:
                entry["parameters"] = params
            models.append(entry)
        top: dict[str, Any] = {}
        for key in spec.params:
            if key in space.parameters:
                value = space.parameters[key]
                top[key] = self._setting(x, key, None) if isinstance(value, Bounds) else value
        if "normalize" in spec.params:
            if space.normalize == "search":
                top["normalize"] = bool(x[self._names.index("normalize")] >= 0.5)
            elif space.normalize is not None:
                top["normalize"] = space.normalize
        recipe: dict[str, Any] = {"merge_method": method, "models": models, "dtype": space.dtype}
        if space.base_model and (spec.uses_base or spec.optional_base):
            recipe["base_model"] = space.base_model
        if top:
            recipe["parameters"] = top
        if spec.statistic is not None and space.data is not None:
            recipe["data"] = space.data.model_dump(mode="json", exclude_none=True)
        return Recipe.from_dict(recipe, source="genome")

    def _method_of(self, x: np.ndarray) -> str:
        methods = self.space.methods
        if len(methods) == 1:
            return methods[0]
        return methods[min(int(x[self._names.index("method")] * len(methods)), len(methods) - 1)]

    def _owner(self, key: str, model: str | None) -> str | None:
        """The model whose genes hold ``key``: None for a global parameter's own genes.

        A key that is per-model for one searched method and global for another (``weight``-like keys
        under a method gene) is read from the first model's genes when used globally.
        """
        if (key, None, 0, self.parts[0]) in self._slots:
            return None
        return model if model is not None else self.space.models[0]

    def _setting(self, x: np.ndarray, key: str, model: str | None) -> Any:
        bounds = self.space.parameters[key]
        assert isinstance(bounds, Bounds)
        owner = self._owner(key, model)
        per_part = {}
        for part in self.parts:
            values = [bounds.scale(x[self._slots[(key, owner, g, part)]]) for g in range(len(self.groups))]
            per_part[part] = [round(values[g], 6) for g, group in enumerate(self.groups) for _ in group]

        def compact(values: list[float]) -> Any:
            return values[0] if len(set(values)) == 1 else values

        if self.parts == ("all",):
            return compact(per_part["all"])
        filtered = [
            {"filter": "self_attn" if part == "attn" else part, "value": compact(per_part[part])}
            for part in self.parts
            if part != "rest"
        ]
        return [*filtered, {"value": compact(per_part["rest"])}]

    # --- encoding ----------------------------------------------------------------------------------
    def encode(self, recipe: Recipe) -> np.ndarray | None:
        """The genes of a recipe this space can produce (None if it cannot express it)."""
        space = self.space
        if recipe.merge_method not in space.methods or recipe.models is None:
            return None
        if [m.model for m in recipe.models] != space.models:
            return None
        x = np.full(self.dim, 0.5)
        if "method" in self._names:
            index = space.methods.index(recipe.merge_method)
            x[self._names.index("method")] = (index + 0.5) / len(space.methods)
        if "normalize" in self._names:
            x[self._names.index("normalize")] = 1.0 if (recipe.parameters or {}).get("normalize") else 0.0
        for (key, model, g, part), slot in self._slots.items():
            top = (recipe.parameters or {}).get(key)
            if model is None:
                setting = top
            else:
                entry = next(m for m in recipe.models if m.model == model)
                setting = (entry.parameters or {}).get(key, top)
            if setting is None:
                continue
            layer = self.groups[g][0]
            t = layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
            name = {"attn": "self_attn.x", "rest": "post_attention_layernorm", "all": "mlp.x"}.get(part, part)
            value = evaluate_setting(setting, f"model.layers.{layer}.{name}.weight", t)
            bounds = space.parameters[key]
            assert isinstance(bounds, Bounds)
            x[slot] = bounds.unscale(float(value))
        return x


class DFSGenome(_Genes):
    """Data-flow space: which source layers are on the path, in order, and their input scales."""

    def __init__(self, space: DataFlowSpace, *, num_layers: int | None = None):
        self.space = space
        counts = {m: (num_layers or _num_layers(m)) for m in space.models}
        if len(set(counts.values())) != 1:
            raise SpaceError(f"models: layer counts differ ({counts}); DFS needs models of one depth")
        self.num_layers = next(iter(counts.values()))
        if num_layers is None:
            for model in space.models:
                check_foldable(json.loads((Path(model) / "config.json").read_text()), model)
        self.slots = [
            (model, layer) for _ in range(space.repeats) for model in space.models for layer in range(self.num_layers)
        ]
        self.max_path = space.max_path_length or 2 * self.num_layers
        self.min_path = min(space.min_path_length, len(self.slots))
        n = len(self.slots)
        self._names = [f"use[{i}]" for i in range(n)] + [f"scale[{i}]" for i in range(n)]

    def decode(self, x: Sequence[float] | np.ndarray) -> Recipe:
        return routing_to_recipe(self.decode_path(x), dtype=self.space.dtype, check=False)

    def decode_path(self, x: Sequence[float] | np.ndarray) -> list[Hop]:
        """The routing a genome encodes, repaired to a valid length."""
        x = _clip(x, self.dim)
        n = len(self.slots)
        use, scale = x[:n], x[n:]
        chosen = [i for i in range(n) if use[i] > 0.5]
        strongest = sorted(range(n), key=lambda i: (-use[i], i))
        if len(chosen) < self.min_path:
            chosen = sorted(set(chosen) | set([i for i in strongest if i not in chosen][: self.min_path - len(chosen)]))
        if len(chosen) > self.max_path:
            keep = set(sorted(chosen, key=lambda i: (-use[i], i))[: self.max_path])
            chosen = [i for i in chosen if i in keep]
        low, high = self.space.scale.low, self.space.scale.high
        return [
            Hop(self.slots[i][0], self.slots[i][1], round(float(low * (high / low) ** scale[i]), 6)) for i in chosen
        ]

    def encode(self, recipe: Recipe) -> np.ndarray | None:
        """The genes of a passthrough routing over this space's slots (None if it is not one)."""
        hops = recipe_to_routing(recipe)
        if hops is None:
            return None
        n = len(self.slots)
        x = np.zeros(2 * n)
        x[n:] = 0.5
        cursor = 0
        low, high = self.space.scale.low, self.space.scale.high
        for hop in hops:
            while cursor < n and self.slots[cursor] != (hop.model, hop.layer):
                cursor += 1
            if cursor == n or not low <= hop.scale <= high:
                return None
            x[cursor] = 1.0
            x[n + cursor] = 0.5 if high == low else math.log(hop.scale / low) / math.log(high / low)
            cursor += 1
        return x


def _choice(gene: float, options: Sequence[Any]) -> Any:
    """The option a categorical gene in [0,1] picks (equal shares of the range)."""
    return options[min(int(gene * len(options)), len(options) - 1)]


def _chosen(genes: np.ndarray, at_least: int) -> list[int]:
    """Indices of the genes >= 0.5, in order; the ``at_least`` strongest when fewer are."""
    picked = [i for i, g in enumerate(genes) if g >= 0.5]
    if len(picked) < at_least:
        picked = sorted(np.argsort(-genes, kind="stable")[:at_least].tolist())
    return picked


class MoEGenome(_Genes):
    """Mixture of experts: which experts, which router prompts, and the listed choices."""

    def __init__(self, space: MoESpace):
        self.space = space
        self._names = [f"expert[{_short(e.source_model)}]" for e in space.experts]
        self._prompt_slots: list[list[int]] = []
        for e in space.experts:
            start = len(self._names)
            self._names += [f"prompt[{_short(e.source_model)}][{i}]" for i in range(len(e.positive_prompts))]
            self._prompt_slots.append(list(range(start, len(self._names))))
        self._choices: dict[str, int] = {}
        for key in ("base_model", "gate_mode", "experts_per_token"):
            if len(getattr(space, key)) > 1:
                self._choices[key] = len(self._names)
                self._names.append(key)

    def _pick(self, x: np.ndarray, key: str) -> Any:
        options = getattr(self.space, key)
        return _choice(float(x[self._choices[key]]), options) if key in self._choices else options[0]

    def decode(self, x: Sequence[float] | np.ndarray) -> MoEConfig:
        x = _clip(x, self.dim)
        per_token = int(self._pick(x, "experts_per_token"))
        experts = []
        for i in _chosen(x[: len(self.space.experts)], per_token):
            expert = self.space.experts[i]
            prompts = [expert.positive_prompts[j] for j in _chosen(x[self._prompt_slots[i]], 1)]
            experts.append({"source_model": expert.source_model, "positive_prompts": prompts})
        return MoEConfig.from_dict(
            {
                "base_model": self._pick(x, "base_model"),
                "gate_mode": self._pick(x, "gate_mode"),
                "experts_per_token": per_token,
                "dtype": self.space.dtype,
                "experts": experts,
            },
            source="genome",
        )

    def encode(self, recipe: Any) -> np.ndarray | None:
        """Not needed by any optimizer's start for this space (no hand-set point to start from)."""
        return None

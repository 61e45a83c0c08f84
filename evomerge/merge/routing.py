"""Layer routing (data-flow space) folded into an ordinary checkpoint.

A routing is a path of hops (model, layer, w): hop t's residual input is multiplied by w_t > 0
(Akiba et al. 2024). In a pre-norm RMSNorm decoder every sublayer sees RMSNorm(h), and
RMSNorm(w·h) = RMSNorm(h) (up to eps), so scaling the residual stream only changes how much each later
sublayer adds relative to it. Dividing hop t's residual writers (``o_proj`` and ``down_proj``) by
S_t = w_1·…·w_t gives a stream that is the scaled one divided by S_t everywhere, and the final RMSNorm
removes that factor: the routed path *is* a stacked model. It is scored, exported and served as a
standard checkpoint, and written as a mergekit ``passthrough`` recipe with per-tensor ``scale``.

As in mergekit, the stacked model takes its embeddings from the first hop's model and its final norm
and LM head from the last hop's model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from evomerge.recipe import ConditionalParameter, Recipe

PRE_NORM_RMS_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""model_type values whose decoder layers are pre-norm RMSNorm with a plain residual (the fold is exact)."""

RESIDUAL_WRITERS = ("o_proj", "down_proj")


class RoutingError(ValueError):
    """A routing that cannot be expressed as an ordinary model."""


@dataclass(frozen=True)
class Hop:
    model: str
    layer: int
    scale: float = 1.0


def check_foldable(config: Mapping[str, Any], model: str) -> None:
    """Refuse architectures where scaling the residual input is not absorbed by the next norm."""
    model_type = config.get("model_type")
    if model_type not in PRE_NORM_RMS_MODELS:
        raise RoutingError(
            f"{model}: model_type {model_type!r} is not a pre-norm RMSNorm decoder, so a routing with input "
            f"scales cannot be folded into its weights exactly (supported: {', '.join(sorted(PRE_NORM_RMS_MODELS))}); "
            "use scale 1 for every hop or another architecture"
        )


def routing_to_recipe(hops: Sequence[Hop], *, dtype: str | None = "float32", check: bool = True) -> Recipe:
    """A passthrough recipe whose hop t has ``o_proj``/``down_proj`` scaled by 1/(w_1·…·w_t).

    With ``check`` (default) and any scale other than 1, every hop's model must be a local checkpoint
    of a foldable architecture (its config.json is read).
    """
    if not hops:
        raise RoutingError("a routing needs at least one hop")
    if check and any(hop.scale != 1.0 for hop in hops):
        for model in dict.fromkeys(hop.model for hop in hops):
            config_path = Path(model) / "config.json"
            try:
                config = json.loads(config_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RoutingError(f"{model}: cannot read {config_path} to check the architecture ({exc})") from None
            check_foldable(config, model)
    slices = []
    cumulative = 1.0
    for index, hop in enumerate(hops):
        if not (math.isfinite(hop.scale) and hop.scale > 0):
            raise RoutingError(f"hops[{index}].scale: must be a finite number > 0, got {hop.scale!r}")
        if hop.layer < 0:
            raise RoutingError(f"hops[{index}].layer: must be >= 0, got {hop.layer}")
        cumulative *= hop.scale
        source: dict[str, Any] = {"model": hop.model, "layer_range": [hop.layer, hop.layer + 1]}
        if cumulative != 1.0:
            inverse = 1.0 / cumulative
            source["parameters"] = {
                "scale": [{"filter": name, "value": inverse} for name in RESIDUAL_WRITERS] + [{"value": 1.0}]
            }
        slices.append({"sources": [source]})
    data: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype:
        data["dtype"] = dtype
    return Recipe.from_dict(data, source="routing")


def recipe_to_routing(recipe: Recipe) -> list[Hop] | None:
    """The routing a passthrough recipe of single-layer slices expresses, or None if it is not one."""
    if recipe.merge_method != "passthrough" or not recipe.slices:
        return None
    hops: list[Hop] = []
    previous = 1.0
    for out_slice in recipe.slices:
        if len(out_slice.sources) != 1 or out_slice.num_layers != 1 or out_slice.parameters:
            return None
        source = out_slice.sources[0]
        inverse = 1.0
        if source.parameters:
            setting = source.parameters.get("scale")
            if not isinstance(setting, list) or not all(isinstance(c, ConditionalParameter) for c in setting):
                return None
            conditions = cast("list[ConditionalParameter]", setting)  # checked just above
            if set(source.parameters) != {"scale"}:
                return None
            # exactly what routing_to_recipe writes: one value for both residual writers, 1.0 elsewhere
            filters = [c.filter for c in conditions]
            if sorted(filters, key=str) != sorted([*RESIDUAL_WRITERS, None], key=str):
                return None
            values = {c.filter: c.value for c in conditions}
            writers = [values[name] for name in RESIDUAL_WRITERS]
            if not all(isinstance(v, float | int) and not isinstance(v, bool) for v in writers):
                return None
            if len(set(writers)) != 1 or values[None] != 1.0:
                return None
            inverse = float(cast("float", writers[0]))  # a number: checked just above
            if not (math.isfinite(inverse) and inverse > 0):
                return None
        cumulative = 1.0 / inverse
        hops.append(Hop(source.model, source.layer_range[0], cumulative / previous))
        previous = cumulative
    return hops

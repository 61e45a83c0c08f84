"""What a search logs, as flat MLflow names and values: the run config as params, a candidate's genes
as a few comparable numbers, objective labels as metric keys.

Pure functions, no MLflow import: the tracker decides when and where these are logged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.recipe import ConditionalParameter, MoEConfig, Recipe, evaluate_setting, is_moe

MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
"""MLflow's limits on a param/metric key and a param value (longer values are cut, with a marker)."""

_BAD_CHARS = re.compile(r"[^/\w.\- ]")


def mlflow_key(name: str) -> str:
    """A valid MLflow metric/param key for ``name``: characters MLflow refuses become ``_``; empty,
    ``.`` and ``..`` path segments are dropped (MLflow refuses names that are not normalized paths)."""
    cleaned = _BAD_CHARS.sub("_", str(name))
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    return key[:MAX_KEY_LENGTH]


def param_value(value: Any) -> str:
    """A param value as text: scalars as themselves, lists/mappings as compact JSON, cut to MLflow's limit."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - 3] + "..."
    return text


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted params: ``optimizer.seed``, ``objectives.0.task``,
    ``search_space.parameters.weight.low``. Lists of scalars stay one value (JSON)."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}" if key else str(i))
        else:
            out[mlflow_key(key)] = param_value(value)

    walk(data, prefix)
    return out


def short_name(model: str) -> str:
    """``/zoo/reverse`` -> ``reverse`` (the last path component)."""
    return Path(str(model).rstrip("/")).name or str(model)


def _short_names(models: list[str]) -> dict[str, str]:
    """Short names per model, disambiguated with the index where two share a last component."""
    shorts = [short_name(m) for m in models]
    return {m: (s if shorts.count(s) == 1 else f"{i}-{s}") for i, (m, s) in enumerate(zip(models, shorts))}


def _gradient_lengths(setting: Any) -> list[int]:
    if isinstance(setting, ConditionalParameter):
        return _gradient_lengths(setting.value)
    if isinstance(setting, list):
        if setting and all(isinstance(e, ConditionalParameter) for e in setting):
            return [n for e in setting for n in _gradient_lengths(e)]
        return [len(setting)]
    return [1]


def layer_count(recipe: Recipe) -> int:
    """Layers a PS recipe's gradients span: the longest gradient list in it (1 if all are scalars)."""
    settings = [s for m in recipe.models or [] for s in (m.parameters or {}).values()]
    settings += list((recipe.parameters or {}).values())
    return max([n for s in settings for n in _gradient_lengths(s)] or [1])


def layer_values(setting: Any, layers: int, part: str = "mlp") -> list[float | None]:
    """A setting evaluated per layer, as mergekit would for a tensor of ``part`` (``mlp`` or ``self_attn``)."""
    values = []
    for i in range(layers):
        t = i / (layers - 1) if layers > 1 else 0.0
        value = evaluate_setting(setting, f"model.layers.{i}.{part}.x.weight", t)
        values.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
    return values


def _mean_over_layers(setting: Any, layers: int) -> float | None:
    values = [v for part in ("self_attn", "mlp") for v in layer_values(setting, layers, part) if v is not None]
    return sum(values) / len(values) if values else None


def gene_summary(recipe_data: Mapping[str, Any] | Recipe) -> dict[str, str]:
    """A few params that make candidates comparable in MLflow's run table.

    - every recipe: ``method``;
    - ``models:`` recipes (parameter space): per model and numeric parameter the mean over layers
      (attention and MLP tensors alike), e.g. ``weight.reverse``, ``density.sort``; top-level numeric
      parameters likewise (``lambda``); true/false ones as they are (``normalize``);
    - routings (data-flow space, passthrough recipes of single-layer slices): ``path_length``,
      ``models_used``, ``hops.<model>`` and the path itself (``path``: ``model:layer`` per hop).
    """
    from evomerge.merge.routing import recipe_to_routing

    if not isinstance(recipe_data, Recipe) and is_moe(recipe_data):
        return _moe_summary(recipe_data)
    recipe = recipe_data if isinstance(recipe_data, Recipe) else Recipe.from_dict(recipe_data, source="record")
    params: dict[str, Any] = {"method": recipe.merge_method}
    if recipe.models is not None:
        layers = layer_count(recipe)
        names = _short_names([m.model for m in recipe.models])
        if recipe.base_model:
            params["base_model"] = short_name(recipe.base_model)
        for entry in recipe.models:
            for key, setting in (entry.parameters or {}).items():
                mean = _mean_over_layers(setting, layers)
                params[f"{key}.{names[entry.model]}"] = round(mean, 6) if mean is not None else setting
        for key, setting in (recipe.parameters or {}).items():
            mean = _mean_over_layers(setting, layers)
            params[key] = round(mean, 6) if mean is not None else setting
        params["layers"] = layers
    else:
        hops = recipe_to_routing(recipe)
        if hops is not None:
            names = _short_names(list(dict.fromkeys(h.model for h in hops)))
            params["path_length"] = len(hops)
            params["models_used"] = ",".join(names.values())
            for model, name in names.items():
                params[f"hops.{name}"] = sum(1 for h in hops if h.model == model)
            params["path"] = " ".join(f"{names[h.model]}:{h.layer}" for h in hops)
            params["mean_scale"] = round(sum(h.scale for h in hops) / len(hops), 6)
        else:
            params["slices"] = len(recipe.slices or [])
    return {mlflow_key(k): param_value(v) for k, v in params.items()}


def _moe_summary(data: Mapping[str, Any]) -> dict[str, str]:
    """A mixture of experts: base, gate mode, experts per token, the experts and each one's prompt count."""
    config = MoEConfig.from_dict(data, source="record")
    names = _short_names([e.source_model for e in config.experts])
    params: dict[str, Any] = {
        "method": "moe",
        "base_model": short_name(config.base_model),
        "gate_mode": config.gate_mode,
        "experts_per_token": config.experts_per_token,
        "experts": ",".join(names[e.source_model] for e in config.experts),
    }
    for e in config.experts:
        params[f"prompts.{names[e.source_model]}"] = len(e.positive_prompts or [])
    return {mlflow_key(k): param_value(v) for k, v in params.items()}

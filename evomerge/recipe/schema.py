"""Recipe: the declarative merge description, in mergekit's config schema.

A recipe is the unit that is exported, hashed (cache key), logged and re-materialized. It reads and
writes the YAML that mergekit's ``mergekit-yaml`` runs, so a recipe found by a search can be handed to
either tool. Validation happens here, once: unknown fields, unknown parameters for the method and
out-of-range values are errors that name the offending field. Methods and their parameters come from
the torch-free declarations in ``evomerge.recipe.methods``, so reading a recipe never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Union, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.recipe.methods import BOOL_PARAMS, PARAM_RANGES, get_method

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]

DTYPES = ("float32", "float16", "bfloat16")


class RecipeError(ValueError):
    """A recipe that cannot be read or is not valid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    """``{filter: "self_attn", value: ...}``: applies to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = Union[ScalarOrGradient, ConditionalParameter, list[ConditionalParameter]]
Parameters = dict[str, ParameterSetting]


class InputModel(_Strict):
    model: str
    parameters: Parameters | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return self

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class DataItems(_Strict):
    """Items of one lm-eval task that data-aware methods compute their statistics on."""

    task: str
    split: str = "search"
    limit: int | None = Field(default=None, gt=0)
    subset_seed: int | None = None
    """With ``limit``: a seeded random subset of that many items instead of the first ``limit``."""
    models: list[str] | None = None
    """Only these input models' statistics use these items (default: every input model's). RegMean
    and Fisher merging as published compute each model's statistics on its own task's data."""


class DataSection(_Strict):
    """``data:`` (evomerge's, not mergekit's): the items a data-aware method (fisher, regmean) reads."""

    items: list[DataItems] = Field(min_length=1)
    include_path: list[str] = Field(default_factory=list)
    """Directories of lm-eval task YAMLs (relative paths resolve against the working directory)."""

    @field_validator("include_path", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def items_for(self, model: str) -> list[DataItems]:
        """The items ``model``'s statistics are computed on."""
        return [item for item in self.items if item.models is None or model in item.models]


def content_hash(data: Mapping[str, Any]) -> str:
    """A short stable hash of plain data: the same content, the same hash, whatever the key order."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Recipe(_Strict):
    """A mergekit merge configuration (``models:`` or ``slices:`` form)."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None
    name: str | None = None
    """A stage name in a multi-stage recipe (mergekit-multi's ``name``); later stages use it as a model."""
    data: DataSection | None = None
    """Data-aware methods only (evomerge's extension; mergekit has no such field)."""

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if (self.models is None) == (self.slices is None):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        if self.models is not None and not self.models:
            raise ValueError("models: must list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: must list at least one slice")
        spec = get_method(self.merge_method)
        valid = set(spec.params) | set(spec.model_params)
        for where, params in self._parameter_blocks():
            for name, setting in params.items():
                if name not in valid:
                    allowed = ", ".join(sorted(valid)) or "none"
                    raise ValueError(
                        f"{where}.{name}: not a parameter of merge_method {self.merge_method!r} (valid: {allowed})"
                    )
                _check_setting(f"{where}.{name}", name, setting)
        if spec.uses_base and not self.base_model and not (self.slices and all(s.base_model for s in self.slices)):
            raise ValueError(f"base_model: merge_method {self.merge_method!r} needs a base_model")
        self._check_data(spec.statistic is not None)
        return self

    def _check_data(self, data_aware: bool) -> None:
        if data_aware and self.data is None:
            raise ValueError(
                f"data: merge_method {self.merge_method!r} computes statistics from data; give data: "
                "{items: [{task: TASK, split: search, limit: N}], include_path: [TASK_DIR]}"
            )
        if not data_aware and self.data is not None:
            raise ValueError(f"data: only data-aware methods (fisher, regmean) read data, not {self.merge_method!r}")
        if self.data is None:
            return
        models = self.referenced_models()
        for i, item in enumerate(self.data.items):
            unknown = [m for m in item.models or [] if m not in models]
            if unknown:
                raise ValueError(f"data.items[{i}].models: {unknown[0]!r} is not a model of this recipe ({models})")
        without = [m for m in models if not self.data.items_for(m)]
        if without:
            raise ValueError(
                f"data.items: no items for model {without[0]!r} (an item without models: serves every model)"
            )

    def _parameter_blocks(self) -> Iterator[tuple[str, Parameters]]:
        if self.parameters:
            yield "parameters", self.parameters
        for i, m in enumerate(self.models or []):
            if m.parameters:
                yield f"models[{i}].parameters", m.parameters
        for i, s in enumerate(self.slices or []):
            if s.parameters:
                yield f"slices[{i}].parameters", s.parameters
            for j, src in enumerate(s.sources):
                if src.parameters:
                    yield f"slices[{i}].sources[{j}].parameters", src.parameters

    # --- identity -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, fields left at their defaults omitted (mergekit style)."""
        return self.model_dump(mode="json", exclude_none=True)

    def content_hash(self) -> str:
        """Stable hash of the recipe's content: same recipe, same hash, whatever the key order."""
        return content_hash(self.to_dict())

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, in first-mention order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    # --- YAML -----------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        """YAML that ``mergekit-yaml`` accepts unmodified."""
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe") -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: expected a mapping with merge_method and models/slices")
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> "Recipe":
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise RecipeError(f"{source}: {_describe(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
        return cls.from_yaml(text, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file, then rename)."""
        from evomerge.atomic import write_text

        write_text(path, self.to_yaml())


# --- multi-stage recipes ----------------------------------------------------------------------


def load_recipe_chain(path: str | Path) -> list[Recipe]:
    """A YAML file of one recipe, or of several ``---``-separated named stages (mergekit-multi's form),
    where a later stage may name an earlier one as a model."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not documents:
        raise RecipeError(f"{path}: empty file; expected a recipe with merge_method and models/slices")
    chain = []
    for i, data in enumerate(documents):
        where = str(path) if len(documents) == 1 else f"{path} (document {i + 1})"
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping with merge_method and models/slices")
        chain.append(Recipe.from_dict(data, source=where))
    names = [r.name for r in chain[:-1]]
    if len(chain) > 1 and (None in names or len(set(names)) != len(names)):
        raise RecipeError(f"{path}: every stage but the last needs a distinct name (got {names})")
    return chain


def substitute_models(recipe: Recipe, mapping: Mapping[str, str]) -> Recipe:
    """The recipe with model references renamed (stage names -> checkpoint paths, or back)."""
    data = recipe.to_dict()
    rename = lambda ref: mapping.get(ref, ref)  # noqa: E731
    for key in ("base_model", "tokenizer_source"):
        if data.get(key):
            data[key] = rename(data[key])
    for entry in data.get("models") or []:
        entry["model"] = rename(entry["model"])
    for out_slice in data.get("slices") or []:
        if out_slice.get("base_model"):
            out_slice["base_model"] = rename(out_slice["base_model"])
        for source in out_slice["sources"]:
            source["model"] = rename(source["model"])
    for item in (data.get("data") or {}).get("items", []):
        if item.get("models"):
            item["models"] = [rename(m) for m in item["models"]]
    return Recipe.from_dict(data)


def chain_to_yaml(chain: list[Recipe]) -> str:
    """Several stages as one multi-document YAML (what ``mergekit-multi`` reads)."""
    return "---\n".join(r.to_yaml() for r in chain)


# --- parameter settings: validation and evaluation ---------------------------------------------


def _numbers_in(setting: Any) -> Iterator[Any]:
    if isinstance(setting, ConditionalParameter):
        yield from _numbers_in(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _numbers_in(item)
    else:
        yield setting


def _check_setting(where: str, name: str, setting: ParameterSetting) -> None:
    if isinstance(setting, list) and not setting:
        raise ValueError(f"{where}: empty list")
    for value in _numbers_in(setting):
        if name in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: must be true or false, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: must be a number (or a gradient list of numbers), got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: must be finite, got {value!r}")
        low, high = PARAM_RANGES.get(name, (-math.inf, math.inf))
        if not low <= value <= high:
            raise ValueError(f"{where}: {value!r} is out of range; valid: [{low}, {high}]")


def evaluate_setting(setting: ParameterSetting | None, tensor_name: str, t: float) -> Any:
    """Resolve one setting for one tensor, as mergekit does.

    Filters match by substring of the tensor name (first match wins; no filter or ``*`` matches all);
    a gradient list ``[a, b, c]`` is interpolated piecewise-linearly at ``t`` in [0, 1] (t is the
    layer's relative position within its slice). Returns ``None`` when nothing applies.
    """
    if setting is None:
        return None
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(e, ConditionalParameter) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        numbers = cast("list[float]", setting)  # every entry a number: checked just above
        scaled = t * (len(numbers) - 1)
        low = int(scaled)
        high = min(len(numbers) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * numbers[low] + frac * numbers[high]
    # a validated list holds only scalars or only conditions (ParameterSetting's two list types)
    for cond in cast("list[ConditionalParameter]", setting):
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            return evaluate_setting(cond.value, tensor_name, t)
    return None


def resolve(name: str, scopes: list[Parameters | None], tensor_name: str, t: float, default: Any) -> Any:
    """First value found for ``name`` in ``scopes`` (highest precedence first), else ``default``."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return default


# --- YAML formatting ---------------------------------------------------------------------------


class _RecipeDumper(yaml.SafeDumper):
    """Numeric lists (gradients, layer ranges) in flow style, like mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)


_BRANCH = re.compile(r"^(bool|int|float|str|none|list\[.*\]|dict\[.*\]|union\[.*\]|function-.*|[A-Z]\w*)$")
"""Loc entries that name a union branch (pydantic tries every type of a union), not a field."""

_VALID = re.compile(r"^Input should be (?:a )?valid (.+)$")


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a RecipeError naming the file if it cannot be read or parsed."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None


def _describe(exc: ValidationError) -> str:
    """Turn pydantic's report into one line per problem, each naming its field path.

    For a union-typed field pydantic reports every branch it tried; only the branch that got
    furthest into the value is kept (the closest reading of what the user meant), and its
    "Input should be a valid X" messages are merged into one "expected X or Y" line.
    """
    groups: dict[str, list[tuple[int, str, str, Any]]] = {}
    order: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        first_branch = next((i for i, p in enumerate(loc) if _BRANCH.match(p)), len(loc))
        key = ".".join(loc[:first_branch])
        path = ".".join(p for p in loc if not _BRANCH.match(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((len(loc) - first_branch, path, msg, err.get("input")))
    lines = []
    for key in order:
        errors = groups[key]
        deepest = max(depth for depth, *_ in errors)
        kept = [(path, msg, value) for depth, path, msg, value in errors if depth == deepest]
        by_path: dict[str, list[str]] = {}
        inputs: dict[str, Any] = {}
        for path, msg, value in kept:
            by_path.setdefault(path, []).append(msg)
            inputs.setdefault(path, value)
        for path, messages in by_path.items():
            messages = list(dict.fromkeys(messages))
            wanted = [m.group(1) for m in map(_VALID.match, messages) if m]
            if len(messages) > 1 and len(wanted) == len(messages):
                kinds = list(dict.fromkeys(wanted))
                text = f"expected {', '.join(kinds[:-1])} or {kinds[-1]} (got {inputs[path]!r})"
            else:
                text = "; ".join(messages)
            lines.append(f"{path}: {text}" if path else text)
    return "; ".join(dict.fromkeys(lines))

"""Plan: recipe + opened checkpoints -> one job per output tensor, every check done up front.

The plan is where mergekit's semantics live (which sources feed which output layer, parameter
precedence, gradients over layers); the engine only executes jobs. Everything that can be wrong with
a recipe or its checkpoints is found here, before a byte is written.

Semantics mirrored from mergekit:
- ``models:`` is one slice spanning every layer of every model (a ``base_model`` that is not listed
  is appended as a source, for every method).
- Output layers are numbered consecutively across slices; layer ``k`` of a slice of ``n`` layers gets
  gradient position ``t = k / (n - 1)`` (``t = 1`` for a one-layer slice).
- Tensors outside the layers: embeddings come from the first slice's sources, everything else
  (final norm, LM head) from the last slice's, both at ``t = 0``.
- Parameter precedence: the slice source's own parameters, then the slice's, then the top level.
  Shared parameters match filters against the output tensor name, per-input ones against the input's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.io import TORCH_DTYPES, Checkpoint, OutputTensor
from evomerge.merge.methods import REQUIRED, MethodSpec, get_method
from evomerge.merge.statistics import StatisticsFile
from evomerge.recipe import OutputSlice, Parameters, Recipe, SliceSource, resolve
from evomerge.recipe.adapters import split_adapter_ref

LAYER_RE = re.compile(r"^(.*?\blayers\.)(\d+)(\..+)$")


class PlanError(ValueError):
    """A recipe that cannot be carried out on these checkpoints; nothing has been written."""


TensorRef = tuple[str, str]
"""(model reference as written in the recipe, tensor name in that model)."""


@dataclass(frozen=True)
class TensorJob:
    """How to compute one output tensor."""

    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorRef, ...]
    """Inputs in recipe order (the base excluded for methods that treat it apart)."""
    base: TensorRef | None
    params: Mapping[str, Any]
    model_params: tuple[Mapping[str, Any], ...]


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    checkpoints: dict[str, Checkpoint]
    jobs: list[TensorJob]
    out_dtype: torch.dtype
    config: dict[str, Any]
    tokenizer_model: str
    layer_sources: list[tuple[str, int]] = field(default_factory=list)
    """For each output layer, the (model, layer) of its first source."""
    statistics: dict[str, StatisticsFile] = field(default_factory=dict)
    """Data-aware methods: each input model's statistics (``merge/statistics.py``)."""
    tokenizer: Any = None
    """The output tokenizer when the models' vocabularies were aligned (``merge/vocabulary.py``); else
    None: ``tokenizer_model``'s tokenizer files are the output's."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)

    def output_layout(self) -> list[OutputTensor]:
        return [OutputTensor(job.name, job.shape, self.out_dtype) for job in self.jobs]

    def close(self) -> None:
        for ckpt in self.checkpoints.values():
            ckpt.close()


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.', 3, '.mlp.up_proj.weight')."""
    match = LAYER_RE.match(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3)


def layer_tensor_names(ckpt: Checkpoint, layer: int) -> list[str]:
    """The names of layer ``layer``'s tensors, in checkpoint order."""
    out = []
    for name in ckpt.tensors:
        parts = split_layer_name(name)
        if parts and parts[1] == layer:
            out.append(name)
    return out


def rename_layer(name: str, layer: int) -> str:
    prefix, _, suffix = split_layer_name(name)  # type: ignore[misc]
    return f"{prefix}{layer}{suffix}"


def open_checkpoints(
    recipe: Recipe,
    *,
    base_dir: Path | None = None,
    allow_pickle: bool = False,
    cache: Mapping[str, Checkpoint] | None = None,
) -> dict[str, Checkpoint]:
    """Open every model the recipe references (relative paths resolve against ``base_dir`` or CWD)."""
    opened: dict[str, Checkpoint] = {}
    for ref in recipe.referenced_models():
        if cache is not None and ref in cache:
            opened[ref] = cache[ref]
            continue

        opened[ref] = open_checkpoint(ref, base_dir=base_dir, allow_pickle=allow_pickle)
    return opened


def open_checkpoint(ref: str, *, base_dir: Path | None = None, allow_pickle: bool = False) -> Checkpoint:
    """One model reference: a checkpoint directory, or mergekit's ``BASE+ADAPTER`` (the base with a PEFT
    LoRA adapter merged in; ``merge/adapters.py``). Relative paths resolve against ``base_dir``."""
    adapted = split_adapter_ref(ref)
    if adapted is not None:
        from evomerge.merge.adapters import AdapterCheckpoint

        base, adapter = (_local(part, ref, base_dir) for part in adapted)
        return AdapterCheckpoint(base, adapter, allow_pickle=allow_pickle)
    return Checkpoint(_local(ref, ref, base_dir), allow_pickle=allow_pickle)


def _local(part: str, ref: str, base_dir: Path | None) -> Path:
    """A local directory of model reference ``ref`` (relative ones resolve against ``base_dir``)."""
    path = Path(part)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise PlanError(
            f"model {ref!r}: {path} does not exist (models must be local checkpoint directories, "
            "or BASE+ADAPTER for a PEFT LoRA adapter)"
        )
    return path


def build_plan(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    statistics: Mapping[str, Path | StatisticsFile] | None = None,
    *,
    base_dir: Path | None = None,
) -> MergePlan:
    """Resolve the recipe against its checkpoints into per-tensor jobs; raise PlanError on any problem.

    A data-aware method (fisher, regmean) needs ``statistics``: per model reference, its statistics file.
    ``base_dir``: what a relative ``tokenizer_source`` directory is relative to (as model paths are)."""
    method = get_method(recipe.merge_method)
    vocabulary = None
    if recipe.tokenizer_source is not None:  # tokenizers may differ: re-index the vocabulary tensors
        from evomerge.merge.vocabulary import VocabularyError, align_vocabularies, aligned_checkpoints

        anchor = recipe.base_model or recipe.referenced_models()[0]
        source = recipe.tokenizer_source
        if source not in ("base", "union", *checkpoints) and base_dir is not None and not Path(source).is_absolute():
            source = str(base_dir / source)
        try:
            vocabulary = align_vocabularies(source, anchor, recipe.base_model, checkpoints)
        except VocabularyError as exc:
            raise PlanError(str(exc)) from None
        if vocabulary is not None:
            checkpoints = aligned_checkpoints(vocabulary, checkpoints)
    _check_compatible(recipe, checkpoints)
    opened_statistics = _open_statistics(recipe, method, statistics)
    slices = _normalized_slices(recipe, checkpoints, method)

    first_model = slices[0].sources[0].model
    reference = checkpoints[recipe.base_model or first_model]
    pre, post = _non_layer_names(reference)

    jobs: list[TensorJob] = []
    for name in pre:
        jobs.append(_job(recipe, method, checkpoints, slices[0], name, {s.model: name for s in slices[0].sources}, 0.0))
    layer_sources: list[tuple[str, int]] = []
    for index, out_slice in enumerate(slices):
        n = out_slice.num_layers
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            out_layer = len(layer_sources)
            first = out_slice.sources[0]
            first_layer = first.layer_range[0] + offset
            layer_sources.append((first.model, first_layer))
            for in_name in layer_tensor_names(checkpoints[first.model], first_layer):
                out_name = rename_layer(in_name, out_layer)
                names = {src.model: rename_layer(in_name, src.layer_range[0] + offset) for src in out_slice.sources}
                jobs.append(_job(recipe, method, checkpoints, out_slice, out_name, names, t, where=f"slices[{index}]"))
    for name in post:
        jobs.append(
            _job(recipe, method, checkpoints, slices[-1], name, {s.model: name for s in slices[-1].sources}, 0.0)
        )

    out_dtype = _output_dtype(recipe, checkpoints, jobs)
    config = _output_config(reference.config, len(layer_sources), out_dtype)
    tokenizer_model = _tokenizer_model(recipe, first_model)
    plan = MergePlan(
        recipe, method, checkpoints, jobs, out_dtype, config, tokenizer_model, layer_sources, opened_statistics
    )
    if vocabulary is not None:
        plan.tokenizer = vocabulary.tokenizer
    return plan


def _open_statistics(
    recipe: Recipe, method: MethodSpec, statistics: Mapping[str, Path | StatisticsFile] | None
) -> dict[str, StatisticsFile]:
    if method.statistic is None:
        return {}
    opened = {}
    for model in recipe.referenced_models():
        given = (statistics or {}).get(model)
        if given is None:
            raise PlanError(
                f"merge_method {method.name!r}: no {method.statistic} statistics for model {model!r} "
                "(they are computed from the recipe's data: items; evomerge merge and the search do it)"
            )
        opened[model] = given if isinstance(given, StatisticsFile) else StatisticsFile(given)
    return opened


# --- checks ----------------------------------------------------------------------------------


def _check_compatible(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> None:
    items = list(checkpoints.items())
    ref_name, ref = items[0]
    for name, ckpt in items[1:]:
        if ckpt.architecture != ref.architecture:
            raise PlanError(
                f"architectures disagree: {ref_name} is {list(ref.architecture)}, {name} is {list(ckpt.architecture)}"
            )
        if ckpt.vocab_size != ref.vocab_size:
            raise PlanError(
                f"vocab sizes disagree: {ref_name} has {ref.vocab_size}, {name} has {ckpt.vocab_size} "
                "(set tokenizer_source: base, union or a model, to re-index their vocabularies to one)"
            )
    for i, out_slice in enumerate(recipe.slices or []):
        for j, src in enumerate(out_slice.sources):
            available = checkpoints[src.model].num_layers
            if src.layer_range[1] > available:
                raise PlanError(
                    f"slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} is out of bounds for "
                    f"{src.model}, which has {available} layers (valid: 0 <= start < end <= {available})"
                )


def _normalized_slices(recipe: Recipe, checkpoints: dict[str, Checkpoint], method: MethodSpec) -> list[OutputSlice]:
    if recipe.slices is not None:
        slices = recipe.slices
    else:
        sources = [
            SliceSource(model=m.model, layer_range=(0, checkpoints[m.model].num_layers), parameters=m.parameters)
            for m in recipe.models or []
        ]
        listed = {s.model for s in sources}
        if recipe.base_model and recipe.base_model not in listed:  # mergekit appends it for every method
            sources.append(
                SliceSource(model=recipe.base_model, layer_range=(0, checkpoints[recipe.base_model].num_layers))
            )
        lengths = {s.layer_range[1] for s in sources}
        if len(lengths) > 1:
            counts = ", ".join(f"{s.model}: {s.layer_range[1]}" for s in sources)
            raise PlanError(f"models: layer counts disagree ({counts}); use slices: to merge models of different depth")
        slices = [OutputSlice(sources=sources)]
    for i, out_slice in enumerate(slices):
        base = out_slice.base_model or recipe.base_model
        models = [s.model for s in out_slice.sources]
        apart = _treats_base_apart(method, base)
        if apart and base not in models:
            raise PlanError(
                f"slices[{i}]: merge_method {method.name!r} needs the base model {base!r} among the sources"
            )
        count = len([m for m in models if not (apart and m == base)])
        if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
            bound = f"{method.min_inputs}..{method.max_inputs if method.max_inputs is not None else 'any'}"
            raise PlanError(
                f"{'slices[%d]' % i if recipe.slices else 'models'}: merge_method {method.name!r} takes "
                f"{bound} input models{' besides the base' if method.uses_base else ''}, got {count}"
            )
    return slices


def _treats_base_apart(method: MethodSpec, base_model: str | None) -> bool:
    """Whether the base model is the method's distinguished ``base`` input rather than one of its inputs."""
    return bool(base_model) and (method.uses_base or method.optional_base)


def _non_layer_names(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """Tensors outside the decoder layers: (before the layers: embeddings, after: final norm, head)."""
    pre: list[str] = []
    post: list[str] = []
    for name in ckpt.tensors:
        if split_layer_name(name) is None:
            (pre if "embed" in name else post).append(name)
    return pre, post


def _job(
    recipe: Recipe,
    method: MethodSpec,
    checkpoints: dict[str, Checkpoint],
    out_slice: OutputSlice,
    out_name: str,
    names: dict[str, str],
    t: float,
    where: str = "models",
) -> TensorJob:
    base_model = out_slice.base_model or recipe.base_model
    shape: tuple[int, ...] | None = None
    for model, name in names.items():
        info = checkpoints[model].tensors.get(name)
        if info is None:
            raise PlanError(f"tensor names disagree: {model} has no tensor {name} (needed for output {out_name})")
        if shape is None:
            shape = info.shape
        elif info.shape != shape:
            raise PlanError(
                f"shapes disagree for {out_name}: {model}'s {name} is {list(info.shape)}, expected {list(shape)}"
            )
        if not info.dtype.is_floating_point:
            raise PlanError(f"{model}: tensor {name} is {info.dtype}, merge methods need floating-point tensors")
    shared_scopes: list[Parameters | None] = [out_slice.parameters, recipe.parameters]
    params = {
        key: _required(resolve(key, shared_scopes, out_name, t, default), key, out_name)
        for key, default in method.params.items()
    }
    inputs: list[TensorRef] = []
    model_params: list[dict[str, Any]] = []
    base: TensorRef | None = None
    apart = _treats_base_apart(method, base_model)
    for src in out_slice.sources:
        ref = (src.model, names[src.model])
        if apart and src.model == base_model:
            base = ref
            continue
        scopes = [src.parameters, out_slice.parameters, recipe.parameters]
        inputs.append(ref)
        model_params.append(
            {
                key: _required(resolve(key, scopes, ref[1], t, default), key, f"{src.model}.{ref[1]}")
                for key, default in method.model_params.items()
            }
        )
    assert shape is not None
    return TensorJob(out_name, shape, tuple(inputs), base, params, tuple(model_params))


def _required(value: Any, key: str, where: str) -> Any:
    if value is REQUIRED:
        raise PlanError(f"parameters.{key}: required but not set for {where}")
    return value


def _output_dtype(recipe: Recipe, checkpoints: dict[str, Checkpoint], jobs: list[TensorJob]) -> torch.dtype:
    """out_dtype, else dtype, else the storage dtype of the first input (as mergekit writes)."""
    name = recipe.out_dtype or recipe.dtype
    if name:
        return TORCH_DTYPES[name]
    model, tensor = (jobs[0].inputs or (jobs[0].base,))[0]  # type: ignore[misc]
    return checkpoints[model].tensors[tensor].dtype


def _output_config(config: Mapping[str, Any], num_layers: int, dtype: torch.dtype) -> dict[str, Any]:
    out = dict(config)
    out["num_hidden_layers"] = num_layers
    dtype_name = str(dtype).removeprefix("torch.")
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:1] * num_layers
    return out


def _tokenizer_model(recipe: Recipe, first_model: str) -> str:
    source = recipe.tokenizer_source
    if source in (None, "base"):
        return recipe.base_model or first_model
    if source == "union":  # the tokens of every model: the plan carries the tokenizer itself
        return recipe.base_model or first_model
    return source

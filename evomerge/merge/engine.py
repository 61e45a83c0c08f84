"""Engine: execute a merge plan tensor by tensor, to disk (sharded safetensors) or into a live model.

Both entry points share ``compute_tensor``, so the model a search scores in memory is bit-for-bit the
model ``evomerge merge`` writes. Peak memory of a disk merge is the inputs and output of one tensor.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from evomerge.merge.io import ShardedWriter, parse_size
from evomerge.merge.plan import MergePlan, PlanError, TensorJob, TensorRef, build_plan, open_checkpoints
from evomerge.recipe import Recipe, substitute_models

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
RECIPE_FILENAME = "evomerge_recipe.yaml"
DEFAULT_SHARD_SIZE = "5GB"

TensorSource = Callable[[TensorRef], torch.Tensor]
"""Returns the stored tensor for (model, name); the default reads the plan's checkpoints."""


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so randomized methods give the same tensor whatever the execution order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def compute_tensor(
    plan: MergePlan,
    job: TensorJob,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    source: TensorSource | None = None,
) -> torch.Tensor:
    """Merge one output tensor; returns it in the compute dtype (float32, or float64 for float64 inputs)."""
    read = source or (lambda ref: plan.checkpoints[ref[0]].get(ref[1]))
    stored = [read(ref) for ref in job.inputs]
    base_stored = read(job.base) if job.base is not None else None
    every = stored + ([base_stored] if base_stored is not None else [])
    compute_dtype = torch.float64 if any(t.dtype == torch.float64 for t in every) else torch.float32
    tensors = [t.to(device=device, dtype=compute_dtype) for t in stored]
    base = base_stored.to(device=device, dtype=compute_dtype) if base_stored is not None else None
    generator = None
    if plan.method.randomized:
        generator = torch.Generator(device=device)
        generator.manual_seed(tensor_seed(seed, job.name))
    return plan.method.fn(tensors, base, job.model_params, job.params, generator)


def _release(plan: MergePlan, job: TensorJob) -> None:
    for model, name in job.inputs + ((job.base,) if job.base is not None else ()):
        plan.checkpoints[model].release(name)


def _progress(jobs: list[TensorJob], enabled: bool, label: str) -> Iterator[TensorJob]:
    if not enabled:
        yield from jobs
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=len(jobs))
        for job in jobs:
            yield job
            bar.advance(task)


def plan_recipe(
    recipe: Recipe, *, base_dir: Path | None = None, allow_pickle: bool = False
) -> MergePlan:
    """Open the recipe's checkpoints and plan it (all validation happens here)."""
    return build_plan(recipe, open_checkpoints(recipe, base_dir=base_dir, allow_pickle=allow_pickle))


def merge_to_disk(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    base_dir: Path | None = None,
    progress: bool = False,
) -> Path:
    """Materialize ``recipe`` as a Hugging Face checkpoint in ``out_dir``.

    Written into a temporary sibling directory and renamed at the end, so a failed or interrupted
    merge never leaves something that looks like a model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    shard_bytes = parse_size(out_shard_size)
    plan = plan_recipe(recipe, base_dir=base_dir, allow_pickle=allow_pickle)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = ShardedWriter(tmp, plan.output_layout(), shard_bytes)
        for job in _progress(plan.jobs, progress, "merging"):
            merged = compute_tensor(plan, job, device=device, seed=seed)
            writer.write(job.name, merged.to(plan.out_dtype))
            del merged
            _release(plan, job)
        writer.finish()
        _write_metadata(plan, tmp, base_dir)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        plan.close()
    return out_dir


def merge_chain_to_disk(chain: list[Recipe], out_dir: str | Path, **options) -> Path:
    """A multi-stage recipe: each named stage is merged (into a temporary directory) and then used
    as a model by the stages after it; the last stage lands in ``out_dir``."""
    if len(chain) == 1:
        return merge_to_disk(chain[0], out_dir, **options)
    out_dir = Path(out_dir)
    progress = options.pop("progress", False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.stages-{uuid.uuid4().hex[:8]}"
    try:
        paths: dict[str, str] = {}
        for stage in chain[:-1]:
            target = work / str(stage.name)
            merge_to_disk(substitute_models(stage, paths), target, progress=progress, **options)
            paths[str(stage.name)] = str(target)
        return merge_to_disk(substitute_models(chain[-1], paths), out_dir, progress=progress, **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_metadata(plan: MergePlan, out: Path, base_dir: Path | None) -> None:
    import json

    (out / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    tokenizer_dir = plan.checkpoints.get(plan.tokenizer_model)
    source_dir = tokenizer_dir.path if tokenizer_dir is not None else Path(plan.tokenizer_model)
    if not source_dir.is_absolute() and base_dir is not None and tokenizer_dir is None:
        source_dir = base_dir / source_dir
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out / name)
    (out / RECIPE_FILENAME).write_text(plan.recipe.to_yaml())


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def materialize_into(
    model: nn.Module,
    plan: MergePlan,
    *,
    seed: int = 0,
    source: TensorSource | None = None,
    jobs: Iterable[TensorJob] | None = None,
) -> None:
    """Write the plan's merged tensors into ``model``'s parameters in place (no disk, no new model).

    The model must have the plan's layout (same tensor names and shapes); tensors are computed on the
    model's device and cast to each parameter's dtype.
    """
    targets = dict(model.state_dict(keep_vars=True))
    selected = list(jobs) if jobs is not None else plan.jobs
    missing = [job.name for job in selected if job.name not in targets]
    if missing:
        raise PlanError(f"the model has no parameter {missing[0]} (and {len(missing) - 1} more): layouts differ")
    with torch.no_grad():
        for job in selected:
            target = targets[job.name]
            if tuple(target.shape) != job.shape:
                raise PlanError(f"{job.name}: model has shape {list(target.shape)}, merge gives {list(job.shape)}")
            merged = compute_tensor(plan, job, device=target.device, seed=seed, source=source)
            target.data.copy_(merged)

"""Engine: execute a merge plan tensor by tensor, to disk (sharded safetensors) or into a live model.

Both entry points share ``compute_blocks``, so the model a search scores in memory is bit-for-bit the
model ``evomerge merge`` writes. Large tensors are merged a block of rows at a time (``blocks.py``),
so peak memory of a disk merge is a few blocks, not a few whole tensors.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import EllipsisType

import torch
from torch import nn

from evomerge.atomic import replace_dir
from evomerge.merge.blocks import BLOCK_KERNELS, WHOLE_TENSOR_MAX, Block, JobInputs
from evomerge.merge.io import ShardedWriter, parse_size
from evomerge.merge.methods import get_method
from evomerge.merge.plan import MergePlan, PlanError, TensorJob, TensorRef, build_plan, open_checkpoints
from evomerge.merge.statistics import StatisticsProvider
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


def job_inputs(
    plan: MergePlan,
    job: TensorJob,
    *,
    device: torch.device | str = "cpu",
    source: TensorSource | None = None,
) -> JobInputs:
    """The job's stored tensors, ready to be read block by block in the compute dtype (float32, or
    float64 when any input is float64). Reading from the plan's checkpoints releases the mapped
    pages of each block once the next one is read."""
    read = source or (lambda ref: plan.checkpoints[ref[0]].get(ref[1]))
    stored = [read(ref) for ref in job.inputs]
    base = read(job.base) if job.base is not None else None
    every = stored + ([base] if base is not None else [])
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in every) else torch.float32

    def release(rows: slice | EllipsisType) -> None:
        _release(plan, job, rows if isinstance(rows, slice) else None)

    return JobInputs(stored, base, dtype=dtype, device=device, release=None if source else release)


def compute_blocks(
    plan: MergePlan,
    job: TensorJob,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    source: TensorSource | None = None,
) -> Iterator[Block]:
    """Merge one output tensor as ``(rows, merged rows)`` pieces, in row order.

    Large float32 tensors of methods with a block kernel are merged block-wise (``merge/blocks.py``);
    the rest whole, by the method's function, as one piece covering every row. Pieces are in the
    compute dtype, or the stored dtype for plain copies; callers cast to the output dtype.
    """
    inputs = job_inputs(plan, job, device=device, source=source)
    job_seed = tensor_seed(seed, job.name)
    kernel = BLOCK_KERNELS.get(plan.method.name)
    if kernel is not None and inputs.numel > WHOLE_TENSOR_MAX and inputs.dtype == torch.float32 and inputs.shape:
        yield from kernel(inputs, job.model_params, job.params, job_seed)
        return
    everything = Ellipsis  # every row (and valid for 0-d tensors, unlike slice(None))
    tensors, base = inputs.read(everything)
    generator = None
    if plan.method.randomized:
        generator = torch.Generator()  # CPU: masks are drawn there on every device (merge/methods.py)
        generator.manual_seed(job_seed)
    statistics = None
    if plan.method.statistic is not None:  # data-aware: each input's statistic of this tensor
        statistics = [plan.statistics[model].get(name) for model, name in job.inputs]
    yield everything, plan.method.fn(tensors, base, job.model_params, job.params, generator, statistics)


def compute_tensor(
    plan: MergePlan,
    job: TensorJob,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    source: TensorSource | None = None,
) -> torch.Tensor:
    """Merge one output tensor whole (pieces from ``compute_blocks`` put together)."""
    pieces = list(compute_blocks(plan, job, device=device, seed=seed, source=source))
    if len(pieces) == 1:
        return pieces[0][1]
    return torch.cat([piece for _, piece in pieces])


def stored_copy(plan: MergePlan, job: TensorJob) -> tuple[Path, int, int] | None:
    """(file, offset, bytes) of a passthrough input that goes to the output unchanged (no scale,
    stored in the output dtype): the disk merge copies those bytes file to file."""
    if plan.method.name != "passthrough" or job.model_params[0].get("scale") is not None:
        return None
    model, name = job.inputs[0]
    checkpoint = plan.checkpoints.get(model)
    if checkpoint is None or checkpoint.pickled or not checkpoint.stored(name):
        return None
    info = checkpoint.tensors[name]
    if info.dtype != plan.out_dtype or info.shape != job.shape:
        return None
    return info.file, info.start, info.nbytes


def _release(plan: MergePlan, job: TensorJob, rows: slice | None = None) -> None:
    """Drop the mapped pages of the job's inputs (of their ``rows`` only, when given)."""
    for model, name in job.inputs + ((job.base,) if job.base is not None else ()):
        plan.checkpoints[model].release(name, rows)


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
    recipe: Recipe,
    *,
    base_dir: Path | None = None,
    allow_pickle: bool = False,
    statistics: StatisticsProvider | None = None,
) -> MergePlan:
    """Open the recipe's checkpoints and plan it (all validation happens here). A data-aware recipe
    (fisher, regmean) needs ``statistics``, which gives each model's statistics file."""
    checkpoints = open_checkpoints(recipe, base_dir=base_dir, allow_pickle=allow_pickle)
    data_aware = get_method(recipe.merge_method).statistic is not None
    return build_plan(
        recipe,
        checkpoints,
        statistics(recipe) if data_aware and statistics is not None else None,
        base_dir=base_dir,
    )


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
    statistics: StatisticsProvider | None = None,
) -> Path:
    """Materialize ``recipe`` as a Hugging Face checkpoint in ``out_dir`` (``statistics``: see ``plan_recipe``).

    Written into a temporary sibling directory and renamed at the end, so a failed or interrupted
    merge never leaves something that looks like a model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    shard_bytes = parse_size(out_shard_size)
    plan = plan_recipe(recipe, base_dir=base_dir, allow_pickle=allow_pickle, statistics=statistics)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = ShardedWriter(tmp, plan.output_layout(), shard_bytes)
        for job in _progress(plan.jobs, progress, "merging"):
            copy = stored_copy(plan, job)
            if copy is not None:
                writer.copy_range(job.name, *copy)
                continue
            pieces = compute_blocks(plan, job, device=device, seed=seed)
            writer.write_pieces(job.name, (piece.to(plan.out_dtype) for _, piece in pieces))
            _release(plan, job)
        writer.finish()
        _write_metadata(plan, tmp, base_dir)
        replace_dir(tmp, out_dir)
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
    if plan.tokenizer is not None:  # aligned vocabularies: the output tokenizer was built, not copied
        plan.tokenizer.save_pretrained(out)
        for name in ("generation_config.json", "chat_template.jinja"):
            source = (
                plan.checkpoints[plan.tokenizer_model].path / name if plan.tokenizer_model in plan.checkpoints else None
            )
            if source is not None and source.is_file():
                shutil.copy2(source, out / name)
        (out / RECIPE_FILENAME).write_text(plan.recipe.to_yaml())
        return
    tokenizer_dir = plan.checkpoints.get(plan.tokenizer_model)
    source_dir = tokenizer_dir.path if tokenizer_dir is not None else Path(plan.tokenizer_model)
    if not source_dir.is_absolute() and base_dir is not None and tokenizer_dir is None:
        source_dir = base_dir / source_dir
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out / name)
    (out / RECIPE_FILENAME).write_text(plan.recipe.to_yaml())


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
            for rows, piece in compute_blocks(plan, job, device=target.device, seed=seed, source=source):
                target.data[rows].copy_(piece)

"""Statistics of data-aware merges, computed by running each source model on task items.

``fisher`` reads each input's diagonal Fisher, ``regmean`` each linear layer's input Gram matrix
(``Statistic`` in ``evomerge.recipe.methods``). Both come from the items of the recipe's ``data:``
section, tokenized exactly as the scorer tokenizes them (``eval/items.py``):

- **Gram**: for every ``nn.Linear`` of the model, ``X^T X / n`` over the n real (unpadded) tokens of
  every row, X the layer's inputs (RegMean, Jin et al. 2023).
- **Fisher**: per parameter, the mean over items of the squared gradient of the item's loss: the
  per-token NLL of its reference continuation (``loglikelihood``), or the cross-entropy of its gold
  choice among the choices (``multiple_choice``): the empirical Fisher, one item at a time
  (Matena & Raffel 2022 use per-example gradients too), then scaled to unit norm over all of the
  model's parameters (as FusionBench's ``normalize_fisher_weight``), so that each model's Fisher
  weighs alike whatever its loss scale and ``fisher_floor`` means the same for every model.

A model's statistics are computed once and cached on disk (``$EVOMERGE_CACHE/statistics``, default
``~/.cache/evomerge/statistics``) under a key of the statistic, the model's weight files (path, size,
mtime), the items and the task files: a search's workers, ``evomerge merge`` and ``evomerge eval``
share them, and a changed model or task file gets new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from evomerge.eval.items import TokenItems, token_items
from evomerge.eval.tasks import Objective, prepare_tasks
from evomerge.merge.statistics import StatisticsProvider
from evomerge.recipe import DataItems, Recipe, Statistic, get_method

VERSION = 2
"""Bumped when what a statistic means (or how it is computed) changes: old cache entries are not reused."""

Progress = Callable[[str, int, int], None]
"""(what, done, total): called as items are processed."""


def cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "statistics"


def compute_statistics(
    model: torch.nn.Module,
    items: Sequence[TokenItems],
    statistic: Statistic,
    *,
    batch_tokens: int = 16384,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """The model's ``statistic`` over ``items``, by parameter name (float32, on the CPU)."""
    if statistic == Statistic.GRAM:
        return _gram(model, items, batch_tokens, progress)
    if statistic == Statistic.FISHER:
        return _fisher(model, items, progress)
    raise ValueError(f"unknown statistic {statistic!r}")


def _gram(
    model: torch.nn.Module, items: Sequence[TokenItems], batch_tokens: int, progress: Progress | None
) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    valid: torch.Tensor | None = None  # (rows, width): the current chunk's real tokens

    def hook(name: str) -> Callable[..., None]:
        def collect(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            assert valid is not None
            x = inputs[0][valid].double()  # (tokens, in_features)
            gram = x.T @ x
            sums[name] = sums[name].add_(gram) if name in sums else gram
            counts[name] = counts.get(name, 0) + len(x)

        return collect

    handles = [
        module.register_forward_pre_hook(hook(f"{name}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    chunks = [chunk for objective in items for chunk in objective.chunks(batch_tokens)]
    try:
        with torch.no_grad():
            for done, chunk in enumerate(chunks, 1):
                width = chunk.ids.shape[1]
                valid = torch.arange(width, device=chunk.ids.device)[None, :] < chunk.lengths[:, None]
                model(chunk.ids)
                if progress is not None:
                    progress("gram", done, len(chunks))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / counts[name]).float().cpu() for name, total in sums.items()}


def _fisher(model: torch.nn.Module, items: Sequence[TokenItems], progress: Progress | None) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in parameters.items()}
    singles = [one for objective in items for one in objective.chunks(1)]  # one item (all its choices) each
    for done, one in enumerate(singles, 1):
        model.zero_grad(set_to_none=True)
        one.loss_sum(model(one.ids).logits).backward()
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                sums[name].add_(parameter.grad.double().square())
        if progress is not None:
            progress("fisher", done, len(singles))
    model.zero_grad(set_to_none=True)
    # unit norm over the whole model (FusionBench's normalize_fisher_weight): models' Fishers weigh alike
    # whatever their loss scale, and fisher_floor is relative to that
    norm = torch.sqrt(sum((total / len(singles)).square().sum() for total in sums.values()))  # type: ignore[arg-type]
    scale = 1.0 / float(norm) if float(norm) > 0 else 1.0
    return {name: (total * (scale / len(singles))).float().cpu() for name, total in sums.items()}


# --- one model's statistics, cached -------------------------------------------------------------


def _fingerprint(paths: Iterable[Path]) -> list[list[object]]:
    out: list[list[object]] = []
    for path in sorted(paths):
        stat = path.stat()
        out.append([str(path), stat.st_size, stat.st_mtime_ns])
    return out


def statistics_key(
    model_dir: Path, statistic: Statistic, items: Sequence[DataItems], include_paths: Sequence[str | Path]
) -> str:
    """What a cached statistics file depends on: the statistic, the model's weights, the items and the task files."""
    weights = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json")]
    tasks = [p for d in include_paths for p in Path(d).rglob("*") if p.is_file()]
    content = {
        "version": VERSION,
        "statistic": str(statistic),
        "model": _fingerprint(weights),
        "items": [item.model_dump(mode="json", exclude={"models"}) for item in items],
        "tasks": _fingerprint(tasks),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def model_statistics(
    model_dir: str | Path,
    statistic: Statistic,
    items: Sequence[DataItems],
    include_paths: Sequence[str | Path] = (),
    *,
    device: str = "cpu",
    batch_tokens: int = 16384,
    progress: Progress | None = None,
) -> Path:
    """The statistics file of the model in ``model_dir`` over ``items``: from the cache, or computed now
    (written to a temporary file, then renamed: a cache entry is complete or absent)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir).resolve()
    if not items:
        raise ValueError(f"{model_dir}: no data items to compute {statistic} statistics on")
    path = cache_dir() / f"{statistic}-{statistics_key(model_dir, statistic, items, include_paths)}.safetensors"
    if path.is_file():
        return path
    objectives = [
        Objective(task=i.task, split=i.split, limit=i.limit, subset_seed=i.subset_seed, name=f"data[{n}]")
        for n, i in enumerate(items)
    ]
    prepared, objectives = prepare_tasks(objectives, include_paths)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()  # type: ignore[arg-type]  # transformers' typed .to wrapper
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_rows = token_items(prepared, objectives, model, tokenizer, device, who=f"{statistic} statistics")
    tensors = compute_statistics(model, token_rows, statistic, batch_tokens=batch_tokens, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    metadata = {
        "statistic": str(statistic),
        "model": str(model_dir),
        "items": json.dumps([i.model_dump(mode="json", exclude={"models"}) for i in items]),
        "rows": str(sum(len(r.ids) for r in token_rows)),
    }
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def statistics_provider(
    *,
    base_dir: Path | None = None,
    device: str = "cpu",
    batch_tokens: int = 16384,
    progress: Progress | None = None,
) -> StatisticsProvider:
    """What the merge engine calls for a data-aware recipe: each model's statistics file (computed or cached).

    Model references and ``data.include_path`` entries that are relative resolve against ``base_dir``
    (default: the working directory), as the merge resolves model references."""

    def resolve(ref: str) -> Path:
        path = Path(ref)
        return path if path.is_absolute() or base_dir is None else base_dir / path

    def provide(recipe: Recipe) -> Mapping[str, Path]:
        statistic = get_method(recipe.merge_method).statistic
        if statistic is None:
            return {}
        assert recipe.data is not None  # the recipe schema requires it for data-aware methods
        include_paths = [resolve(p) for p in recipe.data.include_path]
        return {
            model: model_statistics(
                resolve(model),
                statistic,
                recipe.data.items_for(model),
                include_paths,
                device=device,
                batch_tokens=batch_tokens,
                progress=progress,
            )
            for model in recipe.referenced_models()
        }

    return provide

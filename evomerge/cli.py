"""Command line: ``evomerge merge``, ``evomerge zoo build``, ``evomerge route``.

Errors a user can fix (bad recipe, bad checkpoint, bad option) print one clear line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Evolutionary merge-optimization for LLMs: merge fine-tunes of one base model by searched recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="The toy model family used by tests, the demo and benchmarks.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

err = Console(stderr=True)
out = Console()


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _user_errors():
    """The exception types that mean 'your input is wrong', not 'evomerge is broken'."""
    from evomerge.merge.io import CheckpointError
    from evomerge.merge.plan import PlanError
    from evomerge.recipe import RecipeError

    return (RecipeError, PlanError, CheckpointError, FileExistsError, ValueError)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="mergekit-style recipe YAML.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the merged checkpoint to.")],
    device: Annotated[str, typer.Option(help="Where to compute: cpu or cuda.")] = "cpu",
    out_shard_size: Annotated[str, typer.Option(help="Maximum size of one output shard, e.g. 2GB or 500MB.")] = "5GB",
    allow_pickle: Annotated[bool, typer.Option(help="Allow .bin (pickle) checkpoints; only for sources you trust.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for randomized methods (dare, della).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Materialize a recipe as a Hugging Face checkpoint (streaming, sharded safetensors)."""
    from evomerge.merge.engine import merge_to_disk
    from evomerge.recipe import Recipe

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail(f"--device: {device!r} is not valid; use cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device is available on this machine")
    start = time.perf_counter()
    try:
        parsed = Recipe.load(recipe)
        merge_to_disk(
            parsed,
            out_dir,
            device=device,
            out_shard_size=out_shard_size,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            seed=seed,
            base_dir=Path.cwd(),
            progress=not quiet and sys.stderr.isatty(),
        )
    except _user_errors() as exc:
        _fail(str(exc))
    err.print(f"merged {recipe} -> {out_dir} in {time.perf_counter() - start:.1f}s", highlight=False)


@app.command("eval")
def eval_command(
    target: Annotated[Path, typer.Argument(help="A checkpoint directory, or a recipe YAML (merged in memory, never written).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names, e.g. zoo_reverse,zoo_sort.")],
    include_path: Annotated[Optional[list[Path]], typer.Option(help="Directory of task YAMLs (repeatable), e.g. ZOO/tasks.")] = None,
    backend: Annotated[str, typer.Option(help="fast (batched log-likelihood, default) or lm-eval (lm-eval's own evaluator).")] = "fast",
    split: Annotated[str, typer.Option(help="Which item set to score: search or test (or any split the task has).")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N items of each task.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow .bin (pickle) checkpoints; only for sources you trust.")] = False,
) -> None:
    """Score a checkpoint or a recipe on lm-eval tasks; prints task -> metric -> value."""
    import json

    from evomerge.eval.evaluator import CandidateEvaluator
    from evomerge.eval.tasks import Objective, TaskError
    from evomerge.recipe import Recipe

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        _fail("--tasks: give at least one task name")
    if backend not in ("fast", "lm-eval"):
        _fail(f"--backend: {backend!r} is not valid; use fast or lm-eval")
    if limit is not None and limit <= 0:
        _fail("--limit: must be a positive number of items")
    try:
        objectives = [Objective(task=name, split=split, limit=limit) for name in names]
        evaluator = CandidateEvaluator(
            objectives, include_paths=include_path or [], backend=backend, device=device,
            base_dir=Path.cwd(), allow_pickle=allow_pickle,
        )
        if target.is_dir():
            result = evaluator.evaluate_checkpoint(target)
        else:
            result = evaluator.evaluate(Recipe.load(target))
    except (*_user_errors(), TaskError) as exc:
        _fail(str(exc))
    if not result.ok:
        _fail(f"scoring failed: {result.reason}")
    if json_output:
        out.print_json(json.dumps({"target": str(target), "backend": backend, "split": split, **result.to_dict()}))
        return
    from rich.table import Table

    table = Table(title=f"{target} · {backend} backend · split {split}")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task_split, metrics in result.metrics.items():
        for metric, value in metrics.items():
            table.add_row(task_split.split("@")[0], metric, f"{value:.4f}")
    out.print(table)
    err.print(
        f"materialize {result.materialize_seconds:.2f}s · score {result.score_seconds:.2f}s", highlight=False
    )


@zoo_app.command("build")
def zoo_build(
    out_dir: Annotated[Optional[Path], typer.Argument(help="Where to build (default: $EVOMERGE_ZOO_DIR or ~/.cache/evomerge/zoo-seed<N>).")] = None,
    seed: Annotated[int, typer.Option(help="Seed: the same seed always gives the same zoo.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Build (or reuse) the toy model family: a tokenizer, a tiny Llama base, skill specialists, lm-eval tasks."""
    from evomerge.zoo.build import build_zoo, default_zoo_dir

    target = out_dir or default_zoo_dir(seed)
    start = time.perf_counter()
    manifest = build_zoo(target, seed, progress=not quiet)
    err.print(f"zoo ready: {manifest} ({time.perf_counter() - start:.1f}s)", highlight=False)
    out.print(str(manifest), highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

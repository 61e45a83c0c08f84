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

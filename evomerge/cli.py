"""Command line: ``evomerge merge``, ``eval``, ``search``, ``front``, ``export``, ``ui``, ``zoo build|compare``.

Commands parse options, call the library (``evomerge.launch.run_search`` for a search) and print.

Errors a user can fix (bad recipe, bad checkpoint, bad option) print one clear line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, cast

import typer
from rich.console import Console

# Library progress bars (tqdm in transformers, lm-eval, mergekit) would interleave with ours.
os.environ.setdefault("TQDM_DISABLE", "1")


def _number(value: float) -> str:
    """Four decimals, or scientific notation for huge values (perplexities of broken merges)."""
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


app = typer.Typer(
    help="Evolutionary merge-optimization for LLMs: merge fine-tunes of one base model by searched recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="The toy model family used by tests, the demo and benchmarks.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

err = Console(stderr=True)
#: Piped or redirected (a log, the demo), rich would wrap tables at 80 columns; COLUMNS still wins.
PIPED_WIDTH = 160
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _refuse_nonempty(out_dir: Path, overwrite: bool) -> None:
    """Output directories are never merged into: a non-empty one needs --overwrite."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        _fail(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")


def _user_errors():
    """The exception types that mean 'your input is wrong', not 'evomerge is broken'."""
    from evomerge.merge.io import CheckpointError
    from evomerge.merge.plan import PlanError
    from evomerge.recipe import RecipeError

    return (RecipeError, PlanError, CheckpointError, FileExistsError, ValueError)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="mergekit-style recipe YAML (or an adapter_merge: YAML).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the merged checkpoint (or adapter) to.")],
    device: Annotated[str, typer.Option(help="Where to compute: cpu or cuda.")] = "cpu",
    out_shard_size: Annotated[str, typer.Option(help="Maximum size of one output shard, e.g. 2GB or 500MB.")] = "5GB",
    allow_pickle: Annotated[
        bool, typer.Option(help="Allow .bin (pickle) checkpoints; only for sources you trust.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for randomized methods (dare, della).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Materialize a recipe as a Hugging Face checkpoint (streaming, sharded safetensors).

    A multi-document YAML of named stages (mergekit-multi's form) is merged stage by stage.

    A model may be BASE+ADAPTER: a PEFT LoRA adapter merged into its base.

    An adapter merge (a YAML with adapter_merge:, PEFT's combinations) writes a PEFT adapter instead.

    fisher / regmean recipes first compute each model's statistics from their data: items (cached)."""
    from evomerge.merge.engine import merge_chain_to_disk
    from evomerge.recipe import load_recipe_chain

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail(f"--device: {device!r} is not valid; use cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device is available on this machine")
    start = time.perf_counter()
    from evomerge.recipe.adapters import is_adapter_merge

    if is_adapter_merge(recipe):  # adapters in, one PEFT adapter out (not a mergekit recipe)
        from evomerge.merge.adapters import merge_adapters_to_disk
        from evomerge.recipe.adapters import AdapterMerge

        try:
            _refuse_nonempty(out_dir, overwrite)
            merge_adapters_to_disk(AdapterMerge.load(recipe), out_dir, base_dir=Path.cwd(), seed=seed)
        except _user_errors() as exc:
            _fail(str(exc))
        err.print(f"merged adapters {recipe} -> {out_dir} (a PEFT adapter) in {time.perf_counter() - start:.1f}s")
        return
    try:
        chain = load_recipe_chain(recipe)
        merge_chain_to_disk(
            chain,
            out_dir,
            device=device,
            out_shard_size=out_shard_size,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            seed=seed,
            base_dir=Path.cwd(),
            progress=not quiet and sys.stderr.isatty(),
            statistics=_statistics_provider(device, quiet),
        )
    except _user_errors() as exc:
        _fail(str(exc))
    err.print(f"merged {recipe} -> {out_dir} in {time.perf_counter() - start:.1f}s", highlight=False)


def _statistics_provider(device: str, quiet: bool) -> Any:
    """Statistics of data-aware recipes (fisher, regmean), computed with a line per model (cached after)."""
    from evomerge.eval.statistics import statistics_provider

    def progress(what: str, done: int, total: int) -> None:
        if done == 1 and not quiet:
            err.print(f"computing {what} statistics over {total} batches/items (cached afterwards)", highlight=False)

    return statistics_provider(base_dir=Path.cwd(), device=device, progress=progress)


@app.command("eval")
def eval_command(
    target: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint directory, a recipe YAML (merged in memory, never written), an adapter_merge: YAML, "
            "or a mixture-of-experts config (assembled in memory)."
        ),
    ],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names, e.g. zoo_latin,zoo_greek.")],
    include_path: Annotated[
        Optional[list[Path]], typer.Option(help="Directory of task YAMLs (repeatable), e.g. ZOO/tasks.")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="fast (batched log-likelihood, default) or lm-eval (lm-eval's own evaluator).")
    ] = "fast",
    split: Annotated[
        str, typer.Option(help="Which item set to score: search or test (or any split the task has).")
    ] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N items of each task.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Allow .bin (pickle) checkpoints; only for sources you trust.")
    ] = False,
) -> None:
    """Score a checkpoint or a recipe on lm-eval tasks; prints task -> metric -> value."""
    import json

    from evomerge.eval.evaluator import CandidateEvaluator
    from evomerge.eval.tasks import Objective, TaskError

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        _fail("--tasks: give at least one task name")
    if backend not in ("fast", "lm-eval"):
        _fail(f"--backend: {backend!r} is not valid; use fast or lm-eval")
    if limit is not None and limit <= 0:
        _fail("--limit: must be a positive number of items")
    if not target.exists():
        _fail(f"{target}: no such checkpoint directory or recipe file")
    try:
        objectives = [Objective(task=name, split=split, limit=limit) for name in names]
        evaluator = CandidateEvaluator(
            objectives,
            include_paths=include_path or [],
            backend=cast(Literal["fast", "lm-eval"], backend),
            device=device,
            base_dir=Path.cwd(),
            allow_pickle=allow_pickle,
        )
        from evomerge.recipe.adapters import is_adapter_merge

        if target.is_dir():
            result = evaluator.evaluate_checkpoint(target)
        elif is_adapter_merge(target):  # merged into a temporary adapter, scored as BASE+ADAPTER
            result = _eval_adapter_merge(evaluator, target)
        else:
            result = evaluator.evaluate(_load_candidate(target))
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
            table.add_row(task_split.split("@")[0], metric, _number(value))
    out.print(table)
    err.print(f"materialize {result.materialize_seconds:.2f}s · score {result.score_seconds:.2f}s", highlight=False)


def _load_candidate(path: Path) -> Any:
    """A recipe file, or a mixture-of-experts config (``experts:``, e.g. an exported MoE search pick)."""
    from evomerge.recipe import Recipe, candidate_from_dict
    from evomerge.recipe.schema import read_yaml

    data = read_yaml(path)
    return candidate_from_dict(data, source=str(path)) if isinstance(data, dict) else Recipe.load(path)


def _eval_adapter_merge(evaluator: Any, path: Path) -> Any:
    """Score an ``adapter_merge:`` file: its adapters merged into a temporary PEFT adapter, the base with
    that adapter merged in (``BASE+ADAPTER``) scored like any recipe."""
    import tempfile

    from evomerge.merge.adapters import merge_adapters_to_disk
    from evomerge.recipe import Recipe
    from evomerge.recipe.adapters import AdapterMerge

    spec = AdapterMerge.load(path)
    base = Path(spec.base_model)
    base = base if base.is_absolute() else Path.cwd() / base
    with tempfile.TemporaryDirectory(prefix="evomerge-adapter-") as folder:
        adapter = merge_adapters_to_disk(spec, Path(folder) / "adapter", base_dir=Path.cwd())
        recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
        return evaluator.evaluate(Recipe.from_dict(recipe))


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="Run config YAML (configs/*.yaml).")],
    run_dir: Annotated[
        Optional[Path],
        typer.Option(help="Where evaluations.jsonl, state and run.yaml go (default: runs/<config name>)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --run-dir (after Ctrl-C, a crash or kill -9).")
    ] = False,
    budget: Annotated[
        Optional[int], typer.Option(min=1, help="Candidates to score in total (overrides optimizer.budget).")
    ] = None,
    time_limit: Annotated[
        Optional[str], typer.Option(help="Stop after this long, e.g. 8h, 90m (in-flight candidates finish).")
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(help="Ray workers (default: one per CPU locally, per GPU on a cluster); 0 runs in-process."),
    ] = None,
    ray_address: Annotated[
        Optional[str],
        typer.Option(help="Join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray on loopback)."),
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite in the run dir).")
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", help="Override a config value: key=value, dotted keys (e.g. zoo=DIR, optimizer.population=12)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Search merge recipes: an optimizer proposes, Ray workers merge in memory and score, everything is checkpointed."""
    from evomerge.launch import run_search
    from evomerge.search.config import ConfigError
    from evomerge.search.driver import SearchError

    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"runtime.workers={workers}")
    if ray_address:
        overrides.append(f"runtime.ray_address={ray_address}")
    if tracking_uri:
        overrides.append(f"tracking.uri={tracking_uri}")
    if time_limit:
        overrides.append(f"runtime.time_limit={time_limit}")
    try:
        launched = run_search(
            config, run_dir=run_dir, overrides=overrides, resume=resume, budget=budget, progress=not quiet
        )
    except (*_user_errors(), ConfigError, SearchError) as exc:
        _fail(str(exc))
    summary, directory = launched.summary, launched.run_dir
    promoted = f"; {summary.promoted} of them screened candidates scored in full" if summary.promoted else ""
    err.print(
        f"{summary.stopped}: {summary.evaluated} candidates ({summary.failed} failed, {summary.cached} cached{promoted}) "
        f"in {summary.seconds:.0f}s · run dir {directory}",
        highlight=False,
    )
    if summary.stopped not in ("budget", "done"):
        err.print(f"continue with: evomerge search {config} --run-dir {directory} --resume", highlight=False)
    _print_front(directory, json_output=False)


@app.command()
def moe(
    config: Annotated[Path, typer.Argument(help="A mergekit-moe config YAML (base_model, experts, gate_mode, ...).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the Mixtral-style checkpoint to.")],
    device: Annotated[
        str, typer.Option(help="Where the base reads the prompts (gate_mode hidden): cpu or cuda.")
    ] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of random gates and of experts' noise_scale.")] = 0,
    out_shard_size: Annotated[str, typer.Option(help="Maximum size of one output shard, e.g. 2GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Assemble a mixture of experts from dense fine-tunes (mergekit-moe's config; Mixtral output).

    Each dense model's MLPs become one expert per layer; attention, embeddings and norms come from
    base_model; each layer's router is set from the experts' prompts (gate_mode hidden: the base's
    hidden states on them; cheap_embed: their token embeddings; random). Model paths are relative to
    CONFIG's directory. The same tensors as mergekit-moe (tests)."""
    from evomerge.merge.moe import MoEError, build_moe
    from evomerge.recipe.moe import MoEConfig

    _refuse_nonempty(out_dir, overwrite)
    start = time.perf_counter()
    try:
        parsed = MoEConfig.load(config)
        build_moe(
            parsed, out_dir, base_dir=config.resolve().parent, device=device, seed=seed, out_shard_size=out_shard_size
        )
    except (*_user_errors(), MoEError) as exc:
        _fail(str(exc))
    err.print(
        f"assembled {len(parsed.experts)} experts ({parsed.experts_per_token} per token, gate_mode {parsed.gate_mode}) "
        f"-> {out_dir} in {time.perf_counter() - start:.1f}s",
        highlight=False,
    )


@app.command()
def align(
    reference: Annotated[Path, typer.Argument(help="The model whose basis the other is permuted into.")],
    model: Annotated[Path, typer.Argument(help="The model to permute (same architecture and shapes).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the permuted model to.")],
    seed: Annotated[
        int, typer.Option(help="Seed of the order weight matching visits the permutations, and of the fit's batches.")
    ] = 0,
    data: Annotated[
        Optional[Path],
        typer.Option(help="A text file, one example per line: match the models' activations on it, not their weights."),
    ] = None,
    rotate: Annotated[
        bool,
        typer.Option(
            help="Also rotate (needs --data): the residual stream, each head group's values, and queries and keys "
            "within each RoPE plane (exact, like the permutations; the RMSNorm weights become REFERENCE's). "
            "Started by orthogonal Procrustes on the activations, then fitted (--fit-steps) so that the midpoint "
            "of REFERENCE and the result predicts the texts of --data: the midpoint then keeps what those texts "
            "cover and not what they leave out (BENCHMARKS.md, 'Permutation alignment')."
        ),
    ] = False,
    fit_steps: Annotated[
        Optional[int],
        typer.Option(
            help="With --rotate: Adam steps fitting the rotations to the midpoint's next-token loss on --data "
            "(default 300; 0: Procrustes only, which alone did not lower the zoo's barrier). The fit does not always "
            "find a good path: check the merge, and try another --seed if it fails."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Permute MODEL's units into REFERENCE's basis (Git Re-Basin weight or activation matching) and write it to OUT_DIR.

    Models trained from different initializations hold the same kinds of units in different orders;
    aligned, they can be interpolated (a linear merge of REFERENCE and OUT_DIR). The residual stream's
    channels, each block's MLP neurons and attention heads (whole key/value groups) are permuted: the
    written model computes what MODEL computes. With --rotate, the continuous symmetries too (the same
    function still), fitted so that the midpoint predicts --data: fit on texts you will not judge the
    merge on. Llama-style models."""
    from evomerge.merge.align import AlignError, align_checkpoints

    if fit_steps is not None and not rotate:
        _fail("--fit-steps: fitting is of rotations; add --rotate")
    _refuse_nonempty(out_dir, overwrite)
    texts = None
    if data is not None:
        try:
            texts = [line for line in data.read_text().splitlines() if line.strip()]
        except OSError as exc:
            _fail(f"--data {data}: cannot read ({exc.strerror})")
        if not texts:
            _fail(f"--data {data}: no text (one example per line)")
    start = time.perf_counter()
    try:
        found = align_checkpoints(
            reference,
            model,
            out_dir,
            seed=seed,
            data=texts,
            rotate=rotate,
            fit_steps=fit_steps if fit_steps is not None else (300 if rotate else 0),
            progress=True,
        )
    except (*_user_errors(), AlignError) as exc:
        _fail(str(exc))
    moved = found["moved"]
    units = ", ".join(
        f"{kind} {sum(v for k, v in moved.items() if k.split('.')[0] == kind)}" for kind in ("residual", "mlp", "heads")
    )
    inner = found["inner_product"]
    err.print(
        f"aligned {model} to {reference} -> {out_dir} in {time.perf_counter() - start:.1f}s; units moved: {units}; "
        f"<reference, model> {inner['before']:.4g} -> {inner['after']:.4g}",
        highlight=False,
    )


@app.command()
def front(
    run_dir: Annotated[Path, typer.Argument(help="A search's run directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    rescore: Annotated[
        Optional[str],
        typer.Option(
            help="Re-score the front on this held-out split (e.g. test) first; shown next to the search scores."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="For --rescore: auto (CUDA if present), cpu or cuda.")] = "auto",
) -> None:
    """Print the current Pareto front of a run (the best candidate, for one objective)."""
    if rescore:
        from evomerge.eval.tasks import TaskError
        from evomerge.search.rescore import rescore_front
        from evomerge.tracking.rescore import log_rescores

        try:
            values = rescore_front(run_dir, rescore, device=device)
            log_rescores(run_dir, rescore, values)
        except (FileNotFoundError, TaskError, RuntimeError, ValueError) as exc:
            _fail(str(exc))
    _print_front(run_dir, json_output)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A search's run directory.")],
    pick: Annotated[
        str,
        typer.Option(
            help="auto (the optimizer's choice for sweep, soups and gradient, best for CMA-ES, else knee), knee (balanced "
            "front member), best (by the score the optimizer ranked by: weighted sum or weakest objective), "
            "best:OBJECTIVE, optimizer, or a candidate id."
        ),
    ] = "auto",
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Write the picked recipe here (YAML).")
    ] = None,
    front_dir: Annotated[
        Optional[Path], typer.Option(help="Write every front member's recipe here, plus index.json.")
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="Also materialize the picked recipe as a checkpoint here (as `evomerge merge` would)."),
    ] = None,
) -> None:
    """Export recipes as YAML that `evomerge merge` and mergekit's `mergekit-yaml` both run (a mixture-of-experts
    search's picks: mergekit-moe configs, for `evomerge moe` and `mergekit-moe`).

    Recipes of the data-aware methods (fisher, regmean) run in evomerge only; the file's first lines say so.

    --checkpoint DIR materializes the picked recipe as well."""
    from evomerge.atomic import write_text
    from evomerge.recipe import MERGEKIT_METHODS, MoEConfig
    from evomerge.search.export import export_front, export_yaml
    from evomerge.search.picks import PickError, candidate_of, recipe_of
    from evomerge.search.picks import pick as pick_record
    from evomerge.search.report import RunReport
    from evomerge.search.stages import chain_of

    if output is None and front_dir is None and checkpoint is None:
        _fail("give -o FILE (one picked recipe), --checkpoint DIR and/or --front-dir DIR (every front member)")
    try:
        report = RunReport.load(run_dir)
        if output is not None or checkpoint is not None:
            record = pick_record(report, pick)
            values = ", ".join(f"{k}={_number(v)}" for k, v in record.objectives.items())
            mixture = candidate_of(record)
            chain = [] if isinstance(mixture, MoEConfig) else chain_of(recipe_of(record))
            if chain and chain[-1].merge_method not in MERGEKIT_METHODS:
                err.print(
                    f"note: merge_method {chain[-1].merge_method} is evomerge's own (data-aware); mergekit has no "
                    "equivalent, so only `evomerge merge` runs this recipe",
                    highlight=False,
                )
        if output is not None:
            write_text(output, export_yaml(record))
            err.print(f"candidate {record.id} ({values}) -> {output}", highlight=False)
        if checkpoint is not None:
            from evomerge.merge.engine import merge_chain_to_disk
            from evomerge.merge.moe import build_moe

            if isinstance(mixture, MoEConfig):
                build_moe(mixture, checkpoint, base_dir=Path.cwd())
            else:
                merge_chain_to_disk(
                    chain, checkpoint, base_dir=Path.cwd(), statistics=_statistics_provider("cpu", False)
                )
            err.print(f"candidate {record.id} ({values}) materialized -> {checkpoint}", highlight=False)
        if front_dir is not None:
            files = export_front(report, front_dir)
            err.print(f"{len(files)} front recipes -> {front_dir} (index.json lists them)", highlight=False)
    except (FileNotFoundError, PickError, *_user_errors()) as exc:
        _fail(str(exc))


def _print_front(run_dir: Path, json_output: bool) -> None:
    import json

    from evomerge.search.report import RunReport

    try:
        report = RunReport.load(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    from evomerge.search.rescore import load_rescores

    rows = report.front()
    rescores = load_rescores(run_dir)
    if json_output:
        front = [
            {
                **row.to_json(),
                "rescored": {split: values[row.id] for split, values in rescores.items() if row.id in values},
            }
            for row in rows
        ]
        out.print_json(
            json.dumps(
                {
                    "objectives": report.labels,
                    "directions": report.directions,
                    "hypervolume": report.hypervolume(),
                    "front": front,
                }
            )
        )
        return
    from rich import box
    from rich.table import Table

    title = "best candidate" if len(report.labels) == 1 else f"Pareto front · hypervolume {report.hypervolume():.4f}"
    methods = {row.method for row in rows}
    one_method = len(methods) == 1
    title = f"{run_dir} · {title} · {report.count} candidates" + (f" · {methods.pop()}" if one_method else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)  # room for 3 objectives + re-scores in 80 columns
    table.add_column("id", justify="right", min_width=3)
    table.add_column("gen", justify="right", min_width=3)
    names = [label.rpartition("/")[0] for label in report.labels]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: max(prefix.rfind("_"), prefix.rfind("-")) + 1]  # a shared "zoo_" is said once, in the title
    if prefix:
        title += f" · tasks {prefix}*"
        table.title = title
    for label, direction in zip(report.labels, report.directions):
        name, _, metric = label.rpartition("/")
        name = name.removeprefix(prefix)
        arrow = "↑" if direction == "maximize" else "↓"
        table.add_column(
            f"{name or metric}\n{metric if name else ''} {arrow}", justify="right", min_width=6, overflow="fold"
        )
        for split in rescores:
            table.add_column(f"\n{split}", justify="right", style="cyan", min_width=6)
    if not one_method:
        table.add_column("method")
    table.add_column("recipe", min_width=10)
    for row in rows:
        cells = []
        for label in report.labels:
            cells.append(_number(row.objectives[label]))
            for values in rescores.values():
                cells.append(_number(values[row.id][label]) if row.id in values else "-")
        method = [] if one_method else [row.method]
        table.add_row(str(row.id), str(row.generation), *cells, *method, row.recipe_hash[:10])
    out.print(table)


@app.command()
def ui(
    tracking_uri: Annotated[
        Optional[str],
        typer.Option(
            help="MLflow backend store to serve, e.g. sqlite:///runs/x/mlflow.db (default: $MLFLOW_TRACKING_URI)."
        ),
    ] = None,
    run_dir: Annotated[
        Optional[Path], typer.Option(help="A search's run directory: serve its store (RUN_DIR/mlflow.db).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port to serve on, bound to 127.0.0.1.")] = 5000,
    experiment: Annotated[
        Optional[str], typer.Option(help="Experiment to open (default: the run's, else evomerge).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to answer.")] = 120.0,
) -> None:
    """Serve the MLflow UI for a run's store on 127.0.0.1 (one worker) and print the experiment's URL; Ctrl-C stops it."""

    from evomerge.tracking.leaderboard import leaderboard_url
    from evomerge.tracking.server import MlflowServer, ServerError, store_for
    from evomerge.tracking.store import RunLink

    if not 0 < port < 65536:
        _fail(f"--port: {port} is not a port number")
    try:
        store = store_for(run_dir.resolve() if run_dir else None, tracking_uri)
    except ServerError as exc:
        _fail(str(exc))
    if store.startswith(("http://", "https://")):
        out.print(store, highlight=False, soft_wrap=True)  # already a server: nothing to start
        return
    link = RunLink.read(run_dir) if run_dir and experiment is None else None
    if link is not None and link.tracking_uri != store:
        link = None
    if experiment is None and run_dir is not None and (run_dir / "run.yaml").exists():
        import yaml

        experiment = ((yaml.safe_load((run_dir / "run.yaml").read_text()) or {}).get("tracking") or {}).get(
            "experiment"
        )
    server = MlflowServer(store, port=port, cwd=run_dir.resolve() if run_dir else None)

    # SIGTERM/SIGHUP end the command like Ctrl-C (the server goes with it); SIGINT explicitly too: a
    # process started from a background job inherits SIGINT ignored, and `kill -INT` would do nothing
    from evomerge.launch import signals_as_interrupt

    with signals_as_interrupt(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            process = server.start()
            err.print(
                f"starting mlflow server for {store} (pid {process.pid}, log {server.log_path}) ...",
                highlight=False,
                soft_wrap=True,
            )
            server.wait_ready(timeout)
            experiment_id = link.experiment_id if link else server.experiment_id(experiment or "evomerge")
            err.print(f"MLflow UI on {server.url} - Ctrl-C to stop", highlight=False, soft_wrap=True)
            parent = link.parent_run_id if link else None
            out.print(leaderboard_url(server.url, experiment_id, parent), highlight=False, soft_wrap=True)
            while server.alive():
                time.sleep(0.5)
            _fail(f"mlflow server exited (code {process.returncode}):\n{server.log_tail()}")
        except ServerError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            err.print("stopping the MLflow UI", highlight=False)
        finally:
            server.stop()


@zoo_app.command("build")
def zoo_build(
    out_dir: Annotated[
        Optional[Path],
        typer.Argument(help="Where to build (default: $EVOMERGE_ZOO_DIR or ~/.cache/evomerge/zoo-seed<N>)."),
    ] = None,
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


@zoo_app.command("compare")
def zoo_compare(
    recipes: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Recipe YAMLs to score beside the zoo's own models (label: the file name)."),
    ] = None,
    zoo: Annotated[
        Optional[Path],
        typer.Option(help="The zoo directory (default: $EVOMERGE_ZOO_DIR or ~/.cache/evomerge/zoo-seed0)."),
    ] = None,
    skills: Annotated[
        Optional[str], typer.Option(help="Comma-separated specialists to merge and compare (default: all).")
    ] = None,
    synergy: Annotated[bool, typer.Option("--synergy", help="Add the synergy task as a column.")] = False,
    split: Annotated[str, typer.Option(help="Item split to score: test (held out) or search.")] = "test",
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the scores and retentions as JSON here.")
    ] = None,
) -> None:
    """Base, specialists, hand-set merges and RECIPES side by side: accuracy and gain retention per skill.

    Gain retention = (merge - base) / (specialist - base): 100% keeps all of a fine-tune's gain."""
    import json

    from rich.table import Table

    from evomerge.recipe import Recipe, RecipeError
    from evomerge.zoo.build import default_zoo_dir, load_zoo
    from evomerge.zoo.compare import compare

    zoo_dir = zoo or default_zoo_dir(0)
    zoo_json = zoo_dir / "zoo.json"
    if not zoo_json.is_file():
        _fail(f"--zoo: {zoo_dir} has no zoo.json (build one with `evomerge zoo build {zoo_dir}`)")
    meta = load_zoo(zoo_json)
    chosen = [s.strip() for s in skills.split(",")] if skills else list(meta["models"])
    unknown = [s for s in chosen if s not in meta["models"]]
    if unknown:
        _fail(f"--skills: {', '.join(unknown)} not in the zoo (known: {', '.join(meta['models'])})")
    loaded = {}
    for path in recipes or []:
        try:
            loaded[path.stem] = Recipe.load(path).to_dict()
        except (OSError, RecipeError, ValueError) as exc:
            _fail(f"{path}: {exc}")
    with err.status("scoring") as status:
        result = compare(
            zoo_json,
            loaded,
            skills=chosen,
            synergy=synergy,
            split=split,
            progress=lambda label: status.update(f"scoring {label}"),
        )
    table = Table(title=f"{zoo_dir} · split {split} · acc, and gain retention over the base")
    table.add_column("model / merge")
    for skill in result.tasks:
        table.add_column(skill, justify="right")
    for skill in chosen:
        table.add_column(f"kept {skill}", justify="right")
    table.add_column("kept, worst", justify="right")
    best = result.best_hand_set()
    for row, scores in result.scores.items():
        kept = result.retention(row) if row != "base" else {}
        cells = [f"{scores[s]:.3f}" for s in result.tasks]
        cells += [f"{kept[s]:.0%}" if kept else "" for s in chosen]
        cells.append(f"{min(kept.values()):.0%}" if kept and not row.startswith("specialist") else "")
        style = "bold" if row == best or row in loaded else None
        table.add_row(row + (" (best hand-set)" if row == best else ""), *cells, style=style)
    out.print(table)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

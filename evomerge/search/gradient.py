"""``optimizer.name: gradient``: task-arithmetic weights fitted by gradient descent (AdaMerging-style).

The baseline an evolutionary search has to beat (Yang et al. 2024, "AdaMerging": per-layer merge
coefficients learned by gradient). The genes of a task-arithmetic parameter space are the merge's
coefficients, and a task-arithmetic merge is linear in them, so the merged model is differentiable
in the genes: ``theta(x) = base + sum_i c_i(x) * (theta_i - base)``, with each coefficient ``c_i`` an
affine function of the genes. Those affine maps are read off the merge plan itself (the plan of the
recipe the genome decodes, at x = 0 and at each unit vector), so mergekit's per-layer gradients,
filters and parameter precedence are exactly what the fit uses, and a fitted point decodes to the
very recipe the fit evaluated.

The loss is, per objective on its own items (the objectives' split and limit, by lm-eval's own request
construction), the negative log-likelihood of the reference continuation per token (``loglikelihood``
tasks) or the cross-entropy of the gold choice among the choices' log-likelihoods (``multiple_choice``
tasks, as lm-eval's ``acc`` ranks them), averaged over items; ``scalarize: worst`` combines objectives
by a log-sum-exp (a smooth maximum), ``weighted_sum`` by their weighted sum. Adam on the genes, each
step projected back into [0, 1]. The fit runs once, before any candidate is scored, on one of the run's
Ray workers (or in the driver's process with ``--workers 0``), on CUDA when it sees one; ``budget``
points evenly spaced along its trajectory (the start and the end included) are then scored like any
candidates, tracked and exportable, and the optimizer's choice is the best scored one. The fit is part of the pickled optimizer state: a resumed run does not refit.

Needs every source task vector in memory at once (sources + 1 copies of the model, in float32, plus
the merged tensors and their gradients) and tasks scored by log-likelihood (not generative ones).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.eval.items import TokenItems, token_items
from evomerge.search.optimizers import FiniteOptimizer, value_note
from evomerge.search.space import Bounds, ParameterSpace, SearchSpace

if TYPE_CHECKING:
    import torch

    from evomerge.search.config import ResolvedRun
    from evomerge.search.genome import PSGenome

DEFAULT_STEPS = 100
DEFAULT_LR = 0.05
"""Adam's step size, in gene units (a gene spans [0, 1] of its bounds)."""
LOSSES = ("nll", "entropy")
"""``nll``: supervised (the reference answers); ``entropy``: unsupervised, AdaMerging's own (only the
inputs and, for multiple choice, the choices are read)."""


def check_gradient_space(space: SearchSpace) -> None:
    """Refuse a space the fit cannot differentiate (the message names the field and what is valid)."""
    where = "optimizer gradient: the search space"
    if not isinstance(space, ParameterSpace):
        raise ValueError(f"{where} must be kind: ps (merge weights), not {space.kind}")
    if space.methods != ["task_arithmetic"]:
        raise ValueError(f"{where}'s method must be task_arithmetic (linear in its weights), got {space.method!r}")
    searched = sorted(k for k, v in space.parameters.items() if isinstance(v, Bounds))
    if searched != ["weight"]:
        raise ValueError(
            f"{where}'s searched parameters must be exactly weight (give others as plain values), got {searched}"
        )
    if space.normalize not in (None, False):
        raise ValueError(f"{where}: normalize must be false (normalized weights are not linear)")


@dataclass
class Fit:
    """What a gradient fit did: the loss at every step and the genes at the points to score."""

    steps: int
    lr: float
    losses: list[float] = field(default_factory=list)
    """The loss before each step, and after the last (steps + 1 values)."""
    objective_losses: list[list[float]] = field(default_factory=list)
    """Per recorded point, each objective's loss there (its NLL, or its entropy with ``loss: entropy``)."""
    point_steps: list[int] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    """The whole fit; ``setup_seconds`` of it went to reading the sources and tokenizing the items."""
    setup_seconds: float = 0.0
    device: str = "cpu"
    worker: str = "driver"
    """Where the fit ran: the search driver's process, or a Ray worker (its label)."""
    loss: str = "nll"


def point_schedule(steps: int, points: int) -> list[int]:
    """``points`` steps of 0..steps, evenly spaced, the first and the last included (no repeats)."""
    if points <= 1:
        return [steps]
    return sorted({round(i * steps / (points - 1)) for i in range(points)})


class _Coefficients:
    """Per output tensor and source: its task-vector coefficient, an affine function of the genes."""

    def __init__(self, genome: PSGenome, run: ResolvedRun):
        from evomerge.merge.plan import build_plan, open_checkpoints

        self.checkpoints: dict[str, Any] = {}

        def plan_at(x: np.ndarray) -> Any:
            recipe = genome.decode(x)
            opened = open_checkpoints(recipe, base_dir=run.base_dir, cache=self.checkpoints)
            self.checkpoints.update(opened)
            return build_plan(recipe, opened)

        self.plan = plan_at(np.zeros(genome.dim))
        at_zero = self._coefficients(self.plan)
        self.constant = at_zero  # (tensors, sources)
        slopes = []
        for j in range(genome.dim):
            unit = np.zeros(genome.dim)
            unit[j] = 1.0
            slopes.append(self._coefficients(plan_at(unit), like=self.plan) - at_zero)
        self.slope = np.stack(slopes, axis=-1)  # (tensors, sources, genes)

    @staticmethod
    def _coefficients(plan: Any, like: Any = None) -> np.ndarray:
        rows = []
        for i, job in enumerate(plan.jobs):
            if like is not None and (job.name != like.jobs[i].name or job.inputs != like.jobs[i].inputs):
                raise ValueError("optimizer gradient: the merge plan's layout changes with the genes")
            if job.base is None:
                raise ValueError(f"optimizer gradient: {job.name} has no base tensor")
            if bool(job.params.get("normalize")):
                raise ValueError("optimizer gradient: normalize must be false (normalized weights are not linear)")
            lam = float(job.params.get("lambda", 1.0))
            rows.append([lam * float(p["weight"]) for p in job.model_params])
        return np.asarray(rows, dtype=np.float64)


class DifferentiableMerge:
    """The task-arithmetic merge of a genome's sources as a differentiable function of the genes:
    ``params(genes)`` gives every output tensor, equal to what ``evomerge merge`` writes for the
    recipe ``genome.decode(genes)`` (float32)."""

    def __init__(self, run: ResolvedRun, genome: PSGenome, device: str = "cpu"):
        import torch

        check_gradient_space(run.space)
        coefficients = _Coefficients(genome, run)
        self.plan = coefficients.plan
        self.names = [job.name for job in self.plan.jobs]
        self.bases: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor] = []  # per tensor: (sources, *shape)
        try:
            with torch.no_grad():
                for job in self.plan.jobs:
                    assert job.base is not None  # checked in _Coefficients
                    base = self._read(job.base, device)
                    self.bases.append(base)
                    self.deltas.append(torch.stack([self._read(ref, device) - base for ref in job.inputs]))
        finally:
            self.plan.close()
        self.constant = torch.tensor(coefficients.constant, dtype=torch.float32, device=device)
        self.slope = torch.tensor(coefficients.slope, dtype=torch.float32, device=device)

    def _read(self, ref: tuple[str, str], device: str) -> torch.Tensor:
        import torch

        return self.plan.checkpoints[ref[0]].get(ref[1]).to(device=device, dtype=torch.float32).clone()

    def params(self, genes: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        c = self.constant + self.slope @ genes  # (tensors, sources)
        return {
            name: base + torch.tensordot(c[k], delta, dims=1)
            for k, (name, base, delta) in enumerate(zip(self.names, self.bases, self.deltas))
        }


def fit_task_arithmetic(
    run: ResolvedRun,
    genome: PSGenome,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    points: int = 10,
    start: Sequence[float] | None = None,
    scalarize: str = "weighted_sum",
    progress: Callable[[int, float], None] | None = None,
    batch_tokens: int = 16384,
    loss: str = "nll",
) -> Fit:
    """Fit the genes of a task-arithmetic space by gradient descent on the objectives' items.

    Items go through the model in chunks of about ``batch_tokens`` tokens, so the activations of one
    chunk are all a step holds beyond the sources. The gradient stays exact: with several chunks, a
    first pass (no gradient) gives each objective's loss and so its weight in the combined loss, and a
    second accumulates each chunk's weighted gradient on the merged tensors, which one backward pass
    through the merge then turns into the genes' gradient.
    """
    import torch
    from torch.func import functional_call

    from evomerge.eval.evaluator import resolve_device

    if loss not in LOSSES:
        raise ValueError(f"optimizer.loss: {loss!r} is not valid; use {', '.join(LOSSES)}")
    started = time.perf_counter()
    device = resolve_device(run.config.runtime.device)
    merge = DifferentiableMerge(run, genome, device)
    model = _skeleton(merge.plan, device)
    objective_items = _objective_items(run, merge.plan, model, device)
    chunked = [items.chunks(batch_tokens) for items in objective_items]
    sizes = [items.count for items in objective_items]
    weights = torch.tensor(run.weights, dtype=torch.float32, device=device)

    def chunk_sum(params: dict[str, torch.Tensor], chunk: TokenItems) -> torch.Tensor:
        return chunk.loss_sum(functional_call(model, params, (chunk.ids,)).logits, loss)

    def combined(losses: torch.Tensor) -> torch.Tensor:
        if scalarize == "worst":
            return torch.logsumexp(weights * losses, dim=0)
        return (weights * losses).sum()

    x0 = np.full(genome.dim, 0.5) if start is None else np.clip(np.asarray(start, dtype=float), 0, 1)
    genes = torch.tensor(x0, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([genes], lr=lr)
    fit = Fit(steps=steps, lr=lr, device=str(device), loss=loss)
    record_at = set(point_schedule(steps, points))
    one_pass = all(len(chunks) == 1 for chunks in chunked)
    fit.setup_seconds = time.perf_counter() - started
    for step in range(steps + 1):
        # the merge, recorded once per step; the model sees detached copies that collect the gradients
        # of every chunk, which one backward through ``outputs`` then turns into the genes' gradient
        with torch.set_grad_enabled(step < steps):
            outputs = merge.params(genes)
        merged = {name: t.detach().requires_grad_(step < steps) for name, t in outputs.items()}
        if one_pass:  # every objective in one chunk: one forward and backward
            with torch.set_grad_enabled(step < steps):
                losses = torch.stack([chunk_sum(merged, c[0]) / n for c, n in zip(chunked, sizes)])
                total = combined(losses)
                if step < steps:
                    total.backward()
        else:
            with torch.no_grad():
                losses = torch.stack(
                    [sum(chunk_sum(merged, c) for c in chunks) / n for chunks, n in zip(chunked, sizes)]  # type: ignore[misc]
                )
            if step < steps:
                at = losses.clone().requires_grad_(True)
                (share,) = torch.autograd.grad(combined(at), at)  # d(combined loss) / d(each objective's loss)
                for k, (chunks, n) in enumerate(zip(chunked, sizes)):
                    for chunk in chunks:
                        (chunk_sum(merged, chunk) * (share[k] / n)).backward()
            total = combined(losses)
        value = float(total.detach())
        if not math.isfinite(value):
            raise ValueError(f"optimizer gradient: the loss is {value} at step {step}; lower optimizer.lr")
        fit.losses.append(value)
        if step in record_at:
            fit.point_steps.append(step)
            fit.points.append([float(v) for v in genes.detach().cpu()])
            fit.objective_losses.append([float(v) for v in losses.detach().cpu()])
        if progress is not None:
            progress(step, value)
        if step == steps:
            break
        optimizer.zero_grad()
        names = [name for name in outputs if merged[name].grad is not None]
        torch.autograd.backward([outputs[n] for n in names], [merged[n].grad for n in names])
        optimizer.step()
        with torch.no_grad():
            genes.clamp_(0.0, 1.0)
    fit.seconds = time.perf_counter() - started
    return fit


def fit_run(run: ResolvedRun, **options: Any) -> Fit:
    """``fit_task_arithmetic`` over the run's own genome: what the driver, or a Ray worker (``call_on_worker``), runs."""
    from evomerge.search.genome import PSGenome, make_genome

    genome = make_genome(run.space)
    assert isinstance(genome, PSGenome)  # check_gradient_space refuses data-flow spaces
    return fit_task_arithmetic(run, genome, **options)


def _skeleton(plan: Any, device: str) -> torch.nn.Module:
    """A model of the plan's output layout, parameters frozen (the fit supplies them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in plan.config.items() if k != "dtype"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    produced = {job.name for job in plan.jobs}
    missing = [n for n, _ in model.named_parameters() if n not in produced]
    if missing:
        raise ValueError(f"optimizer gradient: the merge does not produce {missing[0]} of the model")
    return model


def _objective_items(run: ResolvedRun, plan: Any, model: Any, device: str) -> list[TokenItems]:
    """Per objective, its items tokenized by lm-eval's own rules."""
    from transformers import AutoTokenizer

    from evomerge.eval.tasks import prepare_tasks

    prepared, objectives = prepare_tasks(run.objectives, run.include_paths)
    tokenizer_dir = plan.checkpoints[plan.tokenizer_model].path if plan.tokenizer_model in plan.checkpoints else None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or plan.tokenizer_model)
    return token_items(prepared, objectives, model, tokenizer, device, who="optimizer gradient")


class Gradient(FiniteOptimizer):
    """Scores the points of a gradient fit (made by the driver) in one batch; its choice is the best."""

    name = "gradient"

    def __init__(
        self,
        dim: int,
        n_objectives: int,
        *,
        population: int,
        seed: int,
        weights: Sequence[float] | None = None,
        scalarize: str = "weighted_sum",
        fit: Fit | None = None,
    ):
        super().__init__(dim, n_objectives, population=population, seed=seed, weights=weights, scalarize=scalarize)
        if fit is None:
            raise ValueError("optimizer gradient: needs its fit (the search driver runs it before scoring)")
        self.fit = fit
        self.X = np.asarray(fit.points, dtype=float).reshape(-1, dim)
        self.planned = len(self.X)
        self.values: np.ndarray | None = None

    @property
    def finished(self) -> bool:
        return self.values is not None

    def ask(self) -> np.ndarray:
        return self.X.copy() if self.values is None else np.empty((0, self.dim))

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        F = np.asarray(F, dtype=float)
        self.values = np.where(np.isfinite(F).all(axis=1), self.scalar(F), np.nan)

    def summary(self) -> dict[str, Any] | None:
        if self.values is None:
            return None
        best = int(np.nanargmin(self.values)) if np.isfinite(self.values).any() else None
        return {
            "steps": self.fit.steps,
            "lr": self.fit.lr,
            "device": self.fit.device,
            "worker": self.fit.worker,
            "loss": self.fit.loss,
            "fit_seconds": self.fit.seconds,
            "setup_seconds": self.fit.setup_seconds,
            "losses": self.fit.losses,
            "point_steps": self.fit.point_steps,
            "objective_losses": self.fit.objective_losses,
            "points": [[*map(float, x), None if np.isnan(v) else float(v)] for x, v in zip(self.X, self.values)],
            "value": value_note(self.scalarize),
            "choice": None if best is None else [float(v) for v in self.X[best]],
        }

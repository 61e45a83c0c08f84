"""Pictures of a run: the front, and the per-layer weights of the best recipes.

matplotlib's object API on the Agg canvas (no pyplot, no GUI, no global figure registry), so this is
safe in the tracker's background thread and nothing stays open after a file is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.recipe import Recipe, is_moe
from evomerge.search.record import CandidateRecord
from evomerge.tracking.summary import layer_count, layer_values, short_name

DPI = 110


def _figure(width: float, height: float):
    """A figure on the Agg canvas. No layout engine: tight/constrained layout doubles the drawing time,
    and these are redrawn every generation; margins are set where labels vary."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
    return path


def _axis_label(label: str, direction: str) -> str:
    return f"{label} ({'higher' if direction == 'maximize' else 'lower'} is better)"


def plot_front(
    path: Path,
    values: Sequence[Sequence[float]],
    front: Sequence[int],
    labels: Sequence[str],
    directions: Sequence[str],
    *,
    ids: Sequence[int] | None = None,
    generations: Sequence[int] | None = None,
) -> Path:
    """Every scored candidate and the front: 1 objective, value per candidate with the best so far;
    2, a scatter with the front highlighted; 3 or more, parallel coordinates (up is better on every axis).

    ``values``: one row per candidate (objective values in ``labels`` order); ``front``: row indices."""
    V = np.asarray(values, dtype=float).reshape(-1, len(labels))
    ids = list(ids) if ids is not None else list(range(len(V)))
    on_front = np.zeros(len(V), dtype=bool)
    on_front[list(front)] = True
    color = np.asarray(generations if generations is not None else np.zeros(len(V)), dtype=float)
    if len(labels) == 1:
        return _save(_single(V[:, 0], ids, directions[0], labels[0]), path)
    if len(labels) == 2:
        return _save(_scatter(V, on_front, color, ids, labels, directions), path)
    return _save(_parallel(V, on_front, labels, directions), path)


def _single(v: np.ndarray, ids: list[int], direction: str, label: str):
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    order = np.argsort(ids)
    x, y = np.asarray(ids)[order], v[order]
    ax.scatter(x, y, s=14, color="0.55", label="candidates")
    best = np.maximum.accumulate(y) if direction == "maximize" else np.minimum.accumulate(y)
    ax.step(x, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("candidate id")
    ax.set_ylabel(_axis_label(label, direction))
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _scatter(V: np.ndarray, on_front: np.ndarray, color: np.ndarray, ids: list[int], labels, directions):
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    rest = ~on_front
    points = ax.scatter(
        V[rest, 0],
        V[rest, 1],
        s=16,
        c=color[rest],
        cmap="viridis",
        alpha=0.6,
        vmin=color.min(initial=0),
        vmax=max(color.max(initial=0), 1e-9),
        label="candidates",
    )
    F = V[on_front]
    order = np.argsort(F[:, 0])
    ax.plot(F[order, 0], F[order, 1], "-o", color="tab:red", markersize=6, linewidth=1.2, label="Pareto front")
    for i in np.flatnonzero(on_front):
        ax.annotate(str(ids[i]), (V[i, 0], V[i, 1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(points, ax=ax, label="generation", ticks=MaxNLocator(integer=True))
    ax.set_xlabel(_axis_label(labels[0], directions[0]))
    ax.set_ylabel(_axis_label(labels[1], directions[1]))
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _parallel(V: np.ndarray, on_front: np.ndarray, labels, directions):
    k = len(labels)
    fig = _figure(max(6.4, 1.6 * k), 4.4)
    ax = fig.add_subplot()
    low, high = V.min(axis=0), V.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    U = (V - low) / span
    flip = np.array([d != "maximize" for d in directions])
    U[:, flip] = 1.0 - U[:, flip]  # up is better everywhere
    x = np.arange(k)
    for row in U[~on_front]:
        ax.plot(x, row, color="0.6", alpha=0.35, linewidth=0.8)
    for row in U[on_front]:
        ax.plot(x, row, color="tab:red", alpha=0.9, linewidth=1.4)
    for j in range(k):
        ax.axvline(j, color="0.2", linewidth=0.8)
        top, bottom = (high[j], low[j]) if not flip[j] else (low[j], high[j])
        ax.annotate(f"{top:.3g}", (j, 1.0), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.annotate(f"{bottom:.3g}", (j, 0.0), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xticks(
        x, [f"{label}\n({'max' if d == 'maximize' else 'min'})" for label, d in zip(labels, directions)], fontsize=8
    )
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set_xlim(-0.15, k - 1 + 0.35)  # room for the value labels right of each axis
    ax.set_title(f"{int(on_front.sum())} on the front (red) of {len(V)} candidates", fontsize=9)
    return fig


def weight_rows(records: Sequence[CandidateRecord], key: str = "weight") -> tuple[list[str], np.ndarray]:
    """Rows (recipe × model) of per-layer values of ``key``: each model's setting evaluated per layer for
    an MLP tensor, layers from the recipe's gradient lengths. Recipes without ``models:`` are skipped."""
    names: list[str] = []
    rows: list[list[float]] = []
    for record in records:
        if is_moe(record.recipe or {}):  # a mixture of experts has no per-layer weights
            continue
        recipe = Recipe.from_dict(dict(record.recipe or {}), source="record")
        if recipe.models is None:
            continue
        layers = layer_count(recipe)
        for entry in recipe.models:
            setting = (entry.parameters or {}).get(key, (recipe.parameters or {}).get(key))
            if setting is None:
                continue
            values = layer_values(setting, layers, "mlp")
            names.append(f"#{record.id} {short_name(entry.model)}")
            rows.append([math.nan if v is None else v for v in values])
    width = max((len(r) for r in rows), default=0)
    matrix = np.full((len(rows), width), math.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return names, matrix


def plot_weights(
    path: Path, records: Sequence[CandidateRecord], key: str = "weight", title: str | None = None
) -> Path | None:
    """Heatmap of the per-layer ``key`` (rows: recipe × model, columns: layers); None when no recipe
    has that parameter (e.g. routings)."""
    names, matrix = weight_rows(records, key)
    if not names:
        return None
    rows, cols = matrix.shape
    fig = _figure(min(2.5 + 0.45 * cols, 16), min(1.2 + 0.32 * rows, 14))
    ax = fig.add_subplot()
    finite = matrix[np.isfinite(matrix)]
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        cmap="viridis",
        vmin=finite.min() if finite.size else 0,
        vmax=finite.max() if finite.size else 1,
    )
    ax.set_yticks(range(rows), names, fontsize=7)
    width_in = fig.get_size_inches()[0]
    fig.subplots_adjust(left=min(0.5, (0.25 + 0.06 * max(len(n) for n in names)) / width_in), right=0.95)
    ax.set_xticks(range(cols), [str(i) for i in range(cols)], fontsize=7)
    ax.set_xlabel("layer")
    if rows * cols <= 96:  # numbers in the cells while they stay readable (and cheap to draw)
        low, high = image.get_clim()
        middle = (low + high) / 2
        for i in range(rows):
            for j in range(cols):
                if math.isfinite(matrix[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{matrix[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="k" if matrix[i, j] > middle else "w",
                    )
    fig.colorbar(image, ax=ax, label=key)
    ax.set_title(title or f"per-layer {key} of the best {len({n.split()[0] for n in names})} recipes", fontsize=9)
    return _save(fig, path)


def plot_optimizer_summary(path: Path, summary: dict[str, Any]) -> Path | None:
    """A finite optimizer's findings: a sweep's points, fit and pick; a soup's ingredients against the
    soup. Scores are the negated scalarized values (higher is better). None for other optimizers."""
    if summary.get("optimizer") == "sweep":
        return _save(_sweep(summary), path)
    if summary.get("optimizer") in ("uniform_soup", "greedy_soup"):
        return _save(_soup(summary), path)
    if summary.get("optimizer") == "gradient":
        return _save(_gradient(summary), path)
    return None


def _gradient(summary: dict[str, Any]):
    """The fit's loss per step and, on a second axis, the score of each scored point of its trajectory."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    losses = summary["losses"]
    ax.plot(range(len(losses)), losses, color="tab:gray", label="fit loss")
    ax.set_xlabel("gradient step")
    ax.set_ylabel("fit loss (NLL of the search items;\n worst: log-sum-exp over objectives)")
    scored = ax.twinx()
    steps = summary["point_steps"]
    scores = [np.nan if row[-1] is None else -row[-1] for row in summary["points"]]
    scored.plot(steps, scores, "o-", color="tab:blue", label="scored point")
    choice = summary.get("choice")
    if choice is not None:
        for step, row in zip(steps, summary["points"]):
            if np.allclose(row[:-1], choice):
                scored.plot([step], [-row[-1]], "*", ms=14, color="tab:red", label="choice")
                break
    scored.set_ylabel("score (higher is better)")
    handles = ax.get_legend_handles_labels()[0] + scored.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    ax.set_title(f"gradient: {summary['steps']} Adam steps (lr {summary['lr']}), {len(steps)} points scored")
    fig.subplots_adjust(left=0.12, right=0.86, bottom=0.14, top=0.9)
    return fig


def _sweep(summary: dict[str, Any]):
    from evomerge.search.sweep import quadratic_features

    points = np.array([[np.nan if v is None else v for v in row] for row in summary["points"]], dtype=float)
    X, score = points[:, :-1], -points[:, -1]
    genes = summary.get("genes") or [f"gene {i}" for i in range(X.shape[1])]
    coefficients = summary.get("coefficients")
    pick = summary.get("pick")
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    if X.shape[1] == 1:
        ax.plot(X[:, 0], score, "o", color="tab:blue", label="grid")
        if coefficients is not None:
            grid = np.linspace(0, 1, 201)[:, None]
            ax.plot(grid[:, 0], -(quadratic_features(grid) @ np.asarray(coefficients)), color="tab:gray", label="fit")
        if pick is not None and summary.get("pick_measured") is not None:
            ax.plot([pick[0]], [-summary["pick_measured"]], "*", ms=14, color="tab:red", label="pick (scored)")
        ax.set_xlabel(f"{genes[0]} (0-1 across its bounds)")
        ax.set_ylabel("score (higher is better)")
        ax.legend(loc="best", fontsize=8)
    else:
        if coefficients is not None:
            axis = np.linspace(0, 1, 101)
            g1, g2 = np.meshgrid(axis, axis, indexing="ij")
            fitted = -(quadratic_features(np.stack([g1.ravel(), g2.ravel()], 1)) @ np.asarray(coefficients))
            contour = ax.contourf(g1, g2, fitted.reshape(g1.shape), levels=20, cmap="viridis")
            fig.colorbar(contour, ax=ax, label="fitted score (higher is better)")
        ax.scatter(X[:, 0], X[:, 1], c="white", edgecolors="black", s=30, label="grid (measured score)")
        for (x1, x2), value in zip(X, score):
            ax.annotate(
                "failed" if np.isnan(value) else f"{value:.2f}",
                (x1, x2),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if pick is not None:
            ax.plot([pick[0]], [pick[1]], "*", ms=16, color="tab:red", label="fit's pick")
        if summary.get("pick_measured") is not None and pick is not None:
            ax.annotate(
                f"{-summary['pick_measured']:.2f}",
                (pick[0], pick[1]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=7,
                color="tab:red",
            )
        ax.set_xlim(-0.05, 1.12)
        ax.set_ylim(-0.05, 1.08)
        ax.set_xlabel(f"{genes[0]} (0-1)")
        ax.set_ylabel(f"{genes[1]} (0-1)")
        ax.legend(loc="best", fontsize=8)
    choice = summary.get("choice")
    if choice is not None:
        at = [choice[0], choice[1]] if X.shape[1] == 2 else [choice[0], _score_at(points, choice, summary)]
        ax.plot(*at, "s", ms=11, mfc="none", mec="tab:red", mew=2, label="choice (best measured)")
        ax.legend(loc="best", fontsize=8)
    ax.set_title("sweep: grid, quadratic fit and its pick")
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.14, top=0.9)
    return fig


def _score_at(points: np.ndarray, genes: Sequence[float], summary: dict[str, Any]) -> float:
    """The measured score at a 1-gene point (a grid point, or the scored pick)."""
    pick, measured = summary.get("pick"), summary.get("pick_measured")
    if pick is not None and measured is not None and np.isclose(pick[0], genes[0]):
        return -float(measured)
    hit = np.flatnonzero(np.isclose(points[:, 0], genes[0]))
    return float(-points[hit[0], -1]) if hit.size else math.nan


def _soup(summary: dict[str, Any]):
    genes = summary.get("genes") or []
    ingredients = [np.nan if v is None else -v for v in summary["ingredients"]]
    names = (
        [_model_of(g) for g in genes] if len(genes) == len(ingredients) else [str(i) for i in range(len(ingredients))]
    )
    soup = summary["soup"]
    soup_score = np.nan if summary.get("soup_value") is None else -summary["soup_value"]
    fig = _figure(max(4.8, 1.0 + 0.8 * len(ingredients)), 3.8)
    ax = fig.add_subplot()
    ax.bar(range(len(ingredients)), ingredients, color="tab:blue", label="ingredient alone")
    ax.bar([len(ingredients)], [soup_score], color="tab:green", label=f"soup of {len(soup)}")
    ax.set_xticks(range(len(ingredients) + 1), [*names, "soup"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"{summary['optimizer']}: soup of {', '.join(names[i] for i in soup)}", fontsize=9)
    finite = [v for v in [*ingredients, soup_score] if np.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(low - 0.2 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    ax.legend(loc="upper left", fontsize=7)
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.22, top=0.9)
    return fig


def _model_of(gene: str) -> str:
    """``weight[sort-soup1][g0]`` -> ``sort-soup1``."""
    import re

    found = re.match(r"\w+\[(.+?)\]", gene)
    return found.group(1) if found else gene

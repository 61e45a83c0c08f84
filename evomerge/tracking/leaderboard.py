"""The leaderboard as MLflow's UI shows it: a saved view of a search's candidates, opened by one URL.

MLflow 3 opens an experiment on its GenAI overview unless the experiment says it is for model
training (experiment tag ``mlflow.experimentKind: custom_model_development``); its runs table shows
a search's child runs folded under the parent and only default columns. Two things MLflow offers fix
that without clicks:

- the runs page reads its search facets (filter, sort key, sort order) and its table state (the
  columns shown) from a *shared view*: an experiment tag ``mlflow.sharedViewState.<key>`` holding that
  state as JSON, opened by ``#/experiments/<id>/runs?viewStateShareKey=<key>``;
- a filter on the parent's id lists its child runs as top-level rows (their parent is not in the
  result), so every candidate is one row.

Each search publishes one view (key ``evomerge-<parent run id>``): its candidates, one column per
objective plus ``score`` (the weighted score ``best`` picks by; higher is better) and the ``pareto``
tag, sorted by ``score`` (by the objective itself when there is one). MLflow has no row highlight, so
Pareto members are marked by the ``pareto`` column (``true``), and ``tags.pareto = 'true'`` in the
search box narrows the table to the front.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
SCORE_METRIC = "score"
"""Per candidate: the weighted score (``RunReport.score``), the leaderboard's sort key."""


def view_key(parent_run_id: str) -> str:
    return f"evomerge-{parent_run_id}"


def column(kind: str, key: str) -> str:
    """A column as MLflow's runs table names it (``metrics.`acc```, ``tags.`pareto```)."""
    return f"{kind}.`{key}`"


def leaderboard_view(
    parent_run_id: str, metric_keys: Sequence[str], directions: Sequence[str], params: Sequence[str] = ()
) -> dict[str, Any]:
    """The runs page state of one search's leaderboard (search facets and table columns)."""
    if len(metric_keys) == 1:
        order_by, ascending = metric_keys[0], directions[0] == "minimize"
    else:
        order_by, ascending = SCORE_METRIC, False
    columns = [column("metrics", key) for key in metric_keys]
    if len(metric_keys) > 1:
        columns.append(column("metrics", SCORE_METRIC))
    columns += [column("tags", "pareto"), column("tags", "status"), column("tags", "fidelity")]
    columns += [column("params", key) for key in params]
    columns += [column("metrics", "generation"), column("metrics", "seconds")]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": column("metrics", order_by),
        "orderByAsc": ascending,
        "selectedColumns": columns,
        "runsHiddenMode": "SHOW_ALL",
    }


def publish_view(client: Any, experiment_id: str, parent_run_id: str, view: Mapping[str, Any]) -> str:
    """Save ``view`` on the experiment (idempotent); returns its key."""
    key = view_key(parent_run_id)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(dict(view), separators=(",", ":")))
    return key


def mark_model_training(client: Any, experiment_id: str) -> None:
    """Make MLflow open the experiment on its runs, not on the GenAI overview (unless it has a kind)."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def leaderboard_url(server_url: str, experiment_id: str | None, parent_run_id: str | None) -> str:
    """Where ``evomerge ui`` sends the user: the search's leaderboard, else the experiment's runs (else
    MLflow's start page, when the store has no such experiment yet)."""
    if experiment_id is None:
        return server_url
    base = f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{base}?viewStateShareKey={view_key(parent_run_id)}" if parent_run_id else base

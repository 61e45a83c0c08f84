"""Log held-out re-scores of front members next to their search-split scores in MLflow."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from evomerge.tracking.store import RunLink, make_client
from evomerge.tracking.summary import mlflow_key

log = logging.getLogger(__name__)


def log_rescores(run_dir: str | Path, split: str, values: Mapping[int, Mapping[str, float]]) -> int:
    """Metrics ``<split>/<objective>`` on each re-scored candidate's child run; returns how many runs got
    them. A run dir without an MLflow link, or a store that does not answer, logs nothing (the numbers
    stay in RUN_DIR/rescore-<split>.json)."""
    link = RunLink.read(run_dir)
    if link is None:
        return 0
    try:
        from mlflow.entities import Metric

        client = make_client(link.tracking_uri)
        runs = client.search_runs(
            [link.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{link.parent_run_id}'", max_results=5000
        )
        by_id = {
            int(r.data.tags["candidate_id"]): r.info.run_id
            for r in runs
            if r.data.tags.get("candidate_id", "").isdigit()
        }
        logged = 0
        for cid, metrics in values.items():
            run_id = by_id.get(int(cid))
            if run_id is None:
                continue
            client.log_batch(
                run_id, metrics=[Metric(f"{split}/{mlflow_key(k)}", float(v), 0, 0) for k, v in metrics.items()]
            )
            client.set_tag(run_id, f"rescored_{split}", "true")
            logged += 1
        return logged
    except Exception as exc:  # tracking must never make a user-facing command fail
        log.warning("could not log re-scores to MLflow: %s", exc)
        return 0

"""End to end on the zoo through the CLI: search -> front (re-scored) -> export -> merge -> eval,
with MLflow holding the parent run, one child per candidate and the held-out re-scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.search.report import RunReport

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_search_to_merged_model(zoo_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(zoo_dir))
    runner = CliRunner()
    run_dir = tmp_path / "run"
    small = "objectives=[{task: zoo_latin, metric: acc, limit: 20}, {task: zoo_greek, metric: acc, limit: 20}]"
    result = runner.invoke(
        app,
        [
            "search",
            str(CONFIGS / "zoo-ps-nsga2.yaml"),
            "--run-dir",
            str(run_dir),
            "--budget",
            "10",
            "--workers",
            "0",
            "-q",
            "--set",
            small,
            "--set",
            "optimizer.population=5",
        ],
    )
    assert result.exit_code == 0, result.output
    report = RunReport.load(run_dir)
    assert report.count == 10 and report.front()

    result = runner.invoke(app, ["front", str(run_dir), "--rescore", "test", "--json"])
    assert result.exit_code == 0, result.output
    rescored = json.loads((run_dir / "rescore-test.json").read_text())
    assert sorted(int(k) for k in rescored) == [r.id for r in report.front()]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("evomerge")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 11 and len(children) == 10
    assert {r.data.tags["pareto"] for r in children} >= {"true"}
    assert all("test/zoo_latin/acc" in r.data.metrics for r in children if r.data.tags.get("rescored_test") == "true")
    assert sum(r.data.tags.get("rescored_test") == "true" for r in children) == len(rescored)

    knee = tmp_path / "knee.yaml"
    assert runner.invoke(app, ["export", str(run_dir), "--pick", "knee", "-o", str(knee)]).exit_code == 0
    assert runner.invoke(app, ["merge", str(knee), str(tmp_path / "merged"), "-q"]).exit_code == 0
    result = runner.invoke(
        app,
        [
            "eval",
            str(tmp_path / "merged"),
            "--tasks",
            "zoo_latin,zoo_greek",
            "--include-path",
            str(zoo_dir / "tasks"),
            "--split",
            "test",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    from evomerge.search.picks import knee as knee_of

    # the materialized knee scores on the test split exactly what the in-memory re-score said
    scores = json.loads(result.stdout)["objectives"]
    assert scores == rescored[str(knee_of(report).id)]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_on_the_zoo(zoo_dir, monkeypatch, config) -> None:
    """Every shipped config resolves on the zoo and decodes a genome into a recipe; the PS+DFS one
    says which earlier run it needs until that run exists."""
    import numpy as np

    from evomerge.recipe import MoEConfig
    from evomerge.search.config import ConfigError, load_run_config
    from evomerge.search.genome import make_genome

    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(zoo_dir))
    if config == "zoo-ps-dfs.yaml" and not (CONFIGS.parent / "runs" / "zoo-ps-cma" / "run.yaml").exists():
        with pytest.raises(ConfigError, match=r"stages\.ps: .*zoo-ps-cma.*run the earlier stage's search first"):
            load_run_config(CONFIGS / config, [])
        return
    run = load_run_config(CONFIGS / config, [])
    run.materialize_stages()
    genome = make_genome(run.space)
    recipe = genome.decode(np.full(genome.dim, 0.5))
    method = "moe" if isinstance(recipe, MoEConfig) else recipe.merge_method  # a mixture-of-experts space
    assert method in ("ties", "passthrough", "task_arithmetic", "linear", "regmean", "moe")
    assert run.objectives

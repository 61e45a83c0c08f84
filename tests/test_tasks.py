"""eval/tasks.py: objectives resolved against lm-eval tasks (directions as the task declares them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.eval.tasks import Objective, TaskError, objective_directions
from evomerge.search.config import ConfigError, resolve_run_config
from evomerge.search.report import RunReport


def write_task(root: Path, name: str, higher_is_better: bool | None) -> None:
    items = root / f"{name}.jsonl"
    items.write_text("".join(json.dumps({"q": f"q{i}", "a": f" a{i}"}) + "\n" for i in range(3)))
    metric = "  - metric: acc\n    aggregation: mean\n"
    if higher_is_better is not None:
        metric += f"    higher_is_better: {str(higher_is_better).lower()}\n"
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    search: {items}\n"
        "test_split: search\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        f"metric_list:\n{metric}"
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_task(root, "lower_better", False)
    write_task(root, "default_acc", None)
    return root


def test_direction_comes_from_the_tasks_own_higher_is_better(tasks) -> None:
    objectives = [
        Objective(task="lower_better", metric="acc"),
        Objective(task="default_acc", metric="acc"),
        Objective(task="lower_better", metric="acc", direction="maximize", name="forced"),
    ]
    assert objective_directions(objectives, [tasks]) == ["minimize", "maximize", "maximize"]


def test_a_metric_the_task_lacks_is_named(tasks) -> None:
    with pytest.raises(TaskError, match=r"lower_better has no metric 'bleu' \(valid: acc"):
        objective_directions([Objective(task="lower_better", metric="bleu")], [tasks])
    with pytest.raises(TaskError, match=r"lower_better has no split 'dev' \(valid: "):
        objective_directions([Objective(task="lower_better", metric="acc", split="dev")], [tasks])


def test_the_run_saves_the_resolved_direction_and_the_report_reads_it(tasks, tmp_path) -> None:
    (tmp_path / "m").mkdir()
    config = {
        "search_space": {"models": ["m"], "method": "linear", "parameters": {"weight": {"low": 0, "high": 1}}},
        "objectives": [{"task": "lower_better", "metric": "acc"}],
        "include_paths": [str(tasks)],
    }
    run = resolve_run_config(config, base_dir=tmp_path)
    saved = run.to_dict()
    assert run.directions == ["minimize"] and saved["objectives"][0]["direction"] == "minimize"
    report = RunReport(saved, [])
    assert report.directions == ["minimize"]
    unknown = resolve_run_config({**config, "objectives": [{"task": "nope", "metric": "acc"}]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="objectives: unknown task"):
        unknown.to_dict()

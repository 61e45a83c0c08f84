"""Every user error of `search`, `front`, `export` and `eval` is one clear message naming the field or
file, exit code 2, no traceback, nothing scored, and an existing run dir left exactly as it was."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "zoo-ps-nsga2.yaml")
SMALL = "objectives=[{task: zoo_latin, metric: acc, limit: 4}]"


def space(**changes: object) -> str:
    fields = {
        "kind": "ps",
        "models": "[latin, greek]",
        "base_model": "base",
        "method": "task_arithmetic",
        "parameters": "{weight: {low: 0.0, high: 1.0}}",
    }
    fields.update({k: str(v) for k, v in changes.items()})
    return "search_space={" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def invoke(*args: str, env: dict[str, str]):
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)
    text = " ".join(result.output.split())  # rich wraps long lines: compare with the wrapping undone
    return result, text


@pytest.fixture(scope="module")
def cli_env(zoo_dir) -> dict[str, str]:
    return {"EVOMERGE_ZOO_DIR": str(zoo_dir), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, cli_env) -> Path:
    """A finished two-candidate run whose directory every bad command must leave untouched."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result, text = invoke(
        "search",
        CONFIG,
        "--run-dir",
        str(run_dir),
        "--workers",
        "0",
        "-q",
        "--budget",
        "2",
        "--set",
        SMALL,
        env=cli_env,
    )
    assert result.exit_code == 0, text
    return run_dir


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


SEARCH_ERRORS = {
    "unknown task": (["--set", "objectives=[{task: zoo_nope, metric: acc}]"], r"unknown task\(s\) zoo_nope"),
    "unknown metric": (
        ["--set", "objectives=[{task: zoo_latin, metric: f1}]"],
        r"zoo_latin/f1: task zoo_latin has no metric 'f1' \(valid: acc",
    ),
    "unknown split": (
        ["--set", "objectives=[{task: zoo_latin, metric: acc, split: dev}]"],
        r"no split 'dev' \(valid: search, test\)",
    ),
    "inverted bounds": (
        ["--set", space(parameters="{weight: {low: 1.0, high: 0.0}}")],
        r"parameters.weight: bounds must be finite with low <= high, got \[1.0, 0.0\]",
    ),
    "unknown model": (["--set", space(models="[latin, nosuch]")], r"model 'nosuch' is neither a zoo name"),
    "unknown method": (["--set", space(method="tiez")], r"unknown method 'tiez'; valid methods: .*ties"),
    "set without =": (["--set", "optimizer.population"], r"--set 'optimizer.population': expected key=value"),
    "set with bad YAML": (["--set", "optimizer.population=[1,"], r"the value is not valid YAML"),
    "unknown config key": (["--set", "optimizer.popsize=4"], r"optimizer.popsize: unknown field"),
    "population of 1": (["--set", "optimizer.population=1"], r"optimizer.population"),
    "unknown optimizer": (["--set", "optimizer.name=bayes"], r"optimizer.name: Input should be 'cma', 'nsga2'"),
    "unknown mode": (["--set", "optimizer.mode=fast"], r"optimizer.mode: Input should be 'barrier' or 'async'"),
    "bad time limit": (["--time-limit", "soon"], r"time limit 'soon': expected a duration"),
    "negative limit": (["--set", "objectives=[{task: zoo_latin, metric: acc, limit: -3}]"], r"objectives.0.limit"),
    "changed space on resume": (["--set", space(), "--set", SMALL], r"--resume: the search_space differs"),
    "other optimizer on resume": (["--set", SMALL, "--set", "optimizer.name=cma"], r"--resume: the optimizer"),
    "async on a barrier run": (["--set", SMALL, "--set", "optimizer.mode=async"], r"its mode differs"),
}


@pytest.mark.parametrize("case", sorted(SEARCH_ERRORS))
def test_search_user_errors(case, existing_run, cli_env) -> None:
    extra, message = SEARCH_ERRORS[case]
    before = snapshot(existing_run)
    args = ["search", CONFIG, "--run-dir", str(existing_run), "--resume", "--workers", "0", "-q", *extra]
    result, text = invoke(*args, env=cli_env)
    assert result.exit_code == 2, text
    assert text.startswith("error: ") and re.search(message, text), text
    assert "Traceback" not in result.output
    assert snapshot(existing_run) == before  # nothing scored, nothing rewritten


OTHER_ERRORS = {
    "search: no such config": (["search", "/no/such.yaml"], r"/no/such.yaml: cannot read"),
    "search: resume nothing": (["search", CONFIG, "--run-dir", "{tmp}/none", "--resume"], r"nothing to resume"),
    "search: budget 0": (["search", CONFIG, "--budget", "0"], r"--budget"),
    "front: not a run dir": (["front", "{tmp}"], r"not a run directory \(no run.yaml\)"),
    "export: unknown pick": (["export", "{run}", "--pick", "zzz", "-o", "{tmp}/x.yaml"], r"zzz"),
    "export: no output": (["export", "{run}"], r"give -o FILE"),
    "eval: no such model": (["eval", "/no/such/model", "--tasks", "zoo_latin"], r"/no/such/model: no such"),
    "eval: no tasks": (["eval", "{run}", "--tasks", ","], r"--tasks: give at least one task name"),
    "eval: bad backend": (["eval", "{run}", "--tasks", "zoo_latin", "--backend", "gpu"], r"--backend: 'gpu'"),
    "eval: bad limit": (
        ["eval", "{run}", "--tasks", "zoo_latin", "--limit", "0"],
        r"--limit: must be a positive number",
    ),
}


@pytest.mark.parametrize("case", sorted(OTHER_ERRORS))
def test_front_export_eval_user_errors(case, existing_run, cli_env, tmp_path) -> None:
    args, message = OTHER_ERRORS[case]
    args = [a.format(tmp=tmp_path, run=existing_run) for a in args]
    before = snapshot(existing_run)
    result, text = invoke(*args, env=cli_env)
    assert result.exit_code == 2, text
    assert re.search(message, text), text
    assert "Traceback" not in result.output
    assert snapshot(existing_run) == before

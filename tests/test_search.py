"""The search as a user runs it: a CLI process on the zoo, killed with SIGKILL or stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.search.report import RunReport
from evomerge.search.rundir import RunDir

TESTS = Path(__file__).parent


# --- the real thing: a search process on the zoo, killed with SIGKILL and resumed ------------------


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_front(zoo_dir, tmp_path) -> None:
    env = {**os.environ, "EVOMERGE_ZOO_DIR": str(zoo_dir), "PYTHONPATH": str(TESTS.parent)}
    config = TESTS.parent / "configs" / "zoo-ps-nsga2.yaml"
    common = ["--set", "optimizer.budget=24", "--set", "optimizer.population=6", "--workers", "0", "-q"]
    small = [
        *common,
        "--set",
        "objectives=[{task: zoo_latin, metric: acc, limit: 20}, {task: zoo_greek, metric: acc, limit: 20}]",
    ]

    whole = cli("search", str(config), "--run-dir", str(tmp_path / "whole"), *small, env=env)
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed_dir = tmp_path / "killed"
    victim = cli("search", str(config), "--run-dir", str(killed_dir), *small, env=env)
    evaluations = killed_dir / "evaluations.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if evaluations.exists() and len(evaluations.read_text().splitlines()) >= 9:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = len(list(RunDir(killed_dir).records()))
    assert 9 <= done_before < 24

    resumed = cli("search", str(config), "--run-dir", str(killed_dir), "--resume", *small, env=env)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    before, after = list(RunDir(tmp_path / "whole").records()), list(RunDir(killed_dir).records())
    assert [r.id for r in after] == list(range(24)), "a candidate was lost or scored twice"
    assert [r.genome for r in after] == [r.genome for r in before]
    assert [r.objectives for r in after] == [r.objectives for r in before]
    assert [r.id for r in RunReport.load(killed_dir).front()] == [
        r.id for r in RunReport.load(tmp_path / "whole").front()
    ]

    shown = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "front", str(killed_dir), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    payload = json.loads(shown.stdout)
    assert [r["id"] for r in payload["front"]] == [r.id for r in RunReport.load(killed_dir).front()]


@pytest.mark.slow
def test_sigterm_stops_a_search_cleanly(zoo_dir, tmp_path) -> None:
    """`kill PID` (SIGTERM) ends a search like Ctrl-C: what was scored is kept, the command says how
    to resume, and the resumed run finishes the budget without scoring anything twice."""
    env = {**os.environ, "EVOMERGE_ZOO_DIR": str(zoo_dir)}
    config = TESTS.parent / "configs" / "zoo-ps-nsga2.yaml"
    args = [
        "--set",
        "optimizer.budget=18",
        "--set",
        "optimizer.population=6",
        "--workers",
        "0",
        "-q",
        "--set",
        "objectives=[{task: zoo_latin, metric: acc, limit: 10}]",
    ]
    run_dir = tmp_path / "run"
    victim = cli("search", str(config), "--run-dir", str(run_dir), *args, env=env)
    evaluations = run_dir / "evaluations.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (evaluations.exists() and len(evaluations.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    output = victim.communicate(timeout=120)[0]
    assert victim.returncode == 0, output
    assert "interrupted" in output and "--resume" in output
    done = len(list(RunDir(run_dir).records()))
    assert 3 <= done < 18
    resumed = cli("search", str(config), "--run-dir", str(run_dir), "--resume", *args, env=env)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    assert [r.id for r in RunDir(run_dir).records()] == list(range(18))

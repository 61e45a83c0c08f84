"""A real cluster on this machine: two Ray nodes on loopback (evomerge.runtime.loopback_cluster), a
search that joins it with --ray-address and puts a worker on each node, the README's overnight command
submitted with `ray job submit`; every listener of both nodes on 127.0.0.1; nothing left behind after
tear-down."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_runtime_local_ray import _is_loopback

from evomerge.search.rundir import RunDir
from evomerge.tracking.store import RunLink, make_client

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_node(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``ray start ... --block`` through evomerge's loopback entry point, in its own process group."""
    command = [sys.executable, "-m", "evomerge.runtime.loopback_cluster", "start", "--block", *args]
    command += ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listeners(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for proc in processes:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN or (conn.status == psutil.CONN_NONE and not conn.raddr):
                found.append((name, conn.laddr.ip, conn.laddr.port))
    return found


def stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def agent_log_tail(temp: str, chars: int = 3000) -> str:
    """The end of the head node's dashboard agent log(s), to say why a job found no agent."""
    logs = sorted(Path(temp).glob("session_*/logs/dashboard_agent*.log"))
    return "".join(f"\n--- {log}:\n{log.read_text(errors='replace')[-chars:]}" for log in logs)


def submit_job(command: list[str], env: dict[str, str], tries: int = 6) -> subprocess.CompletedProcess:
    """``ray job submit``, tried again while Ray answers "No available agent ... please try again later":
    its job server waits only 10 s for the head node's dashboard agent, which under CI load can register
    later than the nodes come up."""
    for _ in range(tries):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(10)
    return done


@pytest.mark.slow
def test_a_search_joins_a_two_node_loopback_cluster(zoo_dir, tmp_path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="evr-", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    head = ray_node(
        "--head",
        f"--port={port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",  # two nodes on one machine: one agent port each
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp}",
        env=env,
    )
    worker = None
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not any(p == port for _, _, p in listeners(tree(head))):
            assert head.poll() is None and time.monotonic() < deadline, "the head node did not start"
            time.sleep(0.5)
        # its own temp dir: two nodes sharing one would share (and clean up) each other's runtime envs
        worker_temp = tempfile.mkdtemp(prefix="evr-", dir="/tmp")
        worker = ray_node(
            f"--address=127.0.0.1:{port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={worker_temp}",
            env=env,
        )
        run_dir = tmp_path / "run"
        search = subprocess.run(
            [
                sys.executable, "-m", "evomerge.cli", "search", str(ROOT / "configs" / "zoo-ps-nsga2.yaml"),
                "--ray-address", f"127.0.0.1:{port}", "--workers", "2", "--run-dir", str(run_dir), "-q",
                "--budget", "6", "--set", "optimizer.population=6",
                "--set", "objectives=[{task: zoo_latin, metric: acc, limit: 4}, {task: zoo_greek, metric: acc, limit: 4}]",
            ],
            env={**env, "EVOMERGE_ZOO_DIR": str(zoo_dir)},
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
        assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
        records = list(RunDir(run_dir).records())
        assert len(records) == 6 and all(r.ok for r in records), [r.reason for r in records]
        nodes = {r.worker.split("@", 1)[1] for r in records if "@" in r.worker}
        assert len(nodes) == 2, [r.worker for r in records]  # one worker on each node (1 CPU each)
        link = RunLink.read(run_dir)  # the run's MLflow store is complete
        client = make_client(link.tracking_uri)
        kids = client.search_runs(
            [link.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{link.parent_run_id}'"
        )
        assert sorted(int(r.data.tags["candidate_id"]) for r in kids) == list(range(6))
        assert client.get_run(link.parent_run_id).info.status == "FINISHED"

        # the README's overnight command, submitted as a Ray job (the job's driver runs on the head node)
        job_dir = tmp_path / "job-run"
        excludes = '{"excludes": [".venv", ".git", "runs", "out", "*.db", "mlruns", "mlartifacts"]}'
        submit = [
            sys.executable, "-m", "evomerge.runtime.loopback_cluster", "job", "submit",
            "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
            "--runtime-env-json", excludes, "--",
            sys.executable, "-m", "evomerge.cli", "search", "configs/zoo-ps-nsga2.yaml",
            "--run-dir", str(job_dir), "--time-limit", "8h", "--set", "optimizer.mode=async",
            "--budget", "4", "--workers", "2", "-q",
            "--set", "objectives=[{task: zoo_latin, metric: acc, limit: 4}]",
        ]  # fmt: skip
        submitted = submit_job(submit, {**env, "EVOMERGE_ZOO_DIR": str(zoo_dir)})
        assert submitted.returncode == 0 and "succeeded" in submitted.stdout + submitted.stderr, (
            submitted.stdout[-3000:] + submitted.stderr[-3000:] + agent_log_tail(temp)
        )
        job_records = list(RunDir(job_dir).records())
        assert len(job_records) == 4 and all(r.ok for r in job_records), [r.reason for r in job_records]
        job_link = RunLink.read(job_dir)
        job_kids = make_client(job_link.tracking_uri).search_runs(
            [job_link.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{job_link.parent_run_id}'"
        )
        assert sorted(int(r.data.tags["candidate_id"]) for r in job_kids) == list(range(4))

        processes = tree(head) + tree(worker)
        found = listeners(processes)
        names = {n for n, _, _ in found}
        assert {"gcs_server", "raylet"} <= names, found
        exposed = [f for f in found if not _is_loopback(f[1])]
        assert not exposed, f"cluster processes listening on a non-loopback address: {exposed}"
    finally:
        for node in (worker, head):
            if node is not None:
                stop(node)
        for directory in (temp, locals().get("worker_temp")):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
    time.sleep(1)
    left = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"

"""The local MLflow UI behind ``evomerge ui``: one ``mlflow server`` process for a store, on loopback.

Started lean (``--workers 1``, ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: the defaults start
several workers and a job runner, about 2 GB), in its own process group so that stopping it stops
everything it spawned, and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from evomerge.tracking.store import DB_FILE, RunLink, default_tracking_uri


class ServerError(RuntimeError):
    """The UI server could not be started (or stopped answering); the message says why."""


def store_for(run_dir: Path | None, tracking_uri: str | None) -> str:
    """The backend store to serve: ``--tracking-uri`` as given, else the run directory's sqlite store."""
    if tracking_uri and run_dir:
        raise ServerError("give --tracking-uri or --run-dir, not both")
    if tracking_uri:
        return tracking_uri
    if run_dir is None:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        raise ServerError("give --run-dir RUN_DIR (a search's run directory) or --tracking-uri URI")
    if not (run_dir / DB_FILE).exists():
        link = RunLink.read(run_dir)
        where = f"; this run logs to {link.tracking_uri}" if link else ""
        raise ServerError(f"{run_dir}: no MLflow store ({DB_FILE}){where}")
    return default_tracking_uri(run_dir)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``host:port``. SO_REUSEADDR as the server itself binds: connections of a server
    just stopped linger in TIME_WAIT for a minute, and they do not keep a new server from starting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class MlflowServer:
    """``mlflow server`` for ``backend_uri`` on ``host:port``; a context manager that stops it on exit."""

    def __init__(self, backend_uri: str, *, port: int = 5000, host: str = "127.0.0.1", cwd: Path | None = None):
        self.backend_uri = backend_uri
        self.port = port
        self.host = host
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> subprocess.Popen[bytes]:
        """Start ``mlflow server`` in its own session (so Ctrl-C in our terminal is ours to handle)."""
        if not port_is_free(self.port, self.host):
            raise ServerError(f"port {self.port} on {self.host} is in use; pass another --port")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        handle, name = tempfile.mkstemp(prefix="evomerge-ui-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(handle, "wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.process

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll ``/health`` until the server answers; ServerError if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(
                    f"mlflow server exited (code {self.process.returncode if self.process else None}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"mlflow server did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def experiment_id(self, name: str) -> str | None:
        """The id of the experiment called ``name`` on the running server (None if there is none)."""
        query = urllib.parse.urlencode({"experiment_name": name})
        try:
            with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=10) as r:
                return str(json.loads(r.read())["experiment"]["experiment_id"])
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and everything it spawned (its own process group): SIGTERM, then SIGKILL."""
        process = self.process
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                if os.name == "posix":
                    os.killpg(process.pid, sig)
                else:  # pragma: no cover
                    process.kill() if sig == signal.SIGKILL else process.terminate()
            except ProcessLookupError:
                break
            try:
                process.wait(timeout)
                if sig == signal.SIGTERM:
                    # the group leader is gone; make sure no worker it started lingers
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

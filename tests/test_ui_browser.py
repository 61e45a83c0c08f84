"""The leaderboard as a user sees it: `evomerge ui` served, opened in headless Chromium.

Needs Chromium (Debian package ``chromium``) and the ``playwright`` package (the test extra); both are
installed by scripts/setup.sh. Skipped, saying which is missing, only where they cannot be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from tracking_support import drive, make_run_dir

from evomerge.tracking import Tracker
from evomerge.tracking.store import RunLink

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
"""Headless Chromium that opens no connection of its own (this machine's network is closed)."""


def chromium() -> str:
    path = os.environ.get("EVOMERGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; scripts/setup.sh does)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_leaderboard_opens_in_a_browser_with_one_column_per_objective(tmp_path, empty_store) -> None:
    browser_path = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    drive(Tracker(config, run_dir.path), run_dir, records)
    link = RunLink.read(run_dir.path)
    front = json.loads(
        subprocess.run(
            [sys.executable, "-m", "evomerge.cli", "front", str(run_dir.path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    # the leaderboard's top row: the candidate with the best weighted score (weights 1), on the front
    sign = {"maximize": 1.0, "minimize": -1.0}
    top = max(
        front["front"],
        key=lambda r: (
            sum(sign[d] * r["objectives"][k] for k, d in zip(front["objectives"], front["directions"])),
            -r["id"],
        ),
    )

    port = free_port()
    out_path, err_path = tmp_path / "ui.out", tmp_path / "ui.err"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        ui = subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "ui", "--run-dir", str(run_dir.path), "--port", str(port)],
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not out_path.read_text().strip() and time.monotonic() < deadline and ui.poll() is None:
            time.sleep(0.3)
        url = out_path.read_text().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{link.experiment_id}/runs?"), err_path.read_text()

        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 2600, "height": 1200})
                page.goto(url)
                rows = page.locator(".ag-center-cols-container .ag-row")
                rows.first.wait_for(timeout=120_000)
                page.wait_for_function(
                    "n => document.querySelectorAll('.ag-center-cols-container .ag-row').length >= n",
                    arg=len(records),
                    timeout=60_000,
                )
                assert "Training runs" in page.inner_text("body")  # a model-training experiment, not GenAI
                headers = {
                    h.get_attribute("col-id"): h.inner_text().strip() for h in page.locator(".ag-header-cell").all()
                }
                for label in front["objectives"]:
                    assert headers.get(f"metrics.`{label}`") == label, headers
                assert headers.get("metrics.`score`") == "score" and headers.get("tags.`pareto`") == "pareto"
                # every candidate is a row (the parent is not), sorted by score: the top row is the best
                assert rows.count() == len(records)
                first = page.locator(".ag-center-cols-container .ag-row[row-index='0']")
                cells = {c.get_attribute("col-id"): c.inner_text().strip() for c in first.locator(".ag-cell").all()}
                for label in front["objectives"]:
                    assert float(cells[f"metrics.`{label}`"]) == pytest.approx(top["objectives"][label], abs=1e-4)
                assert cells["tags.`pareto`"] == "true"
                name = page.locator(".ag-pinned-left-cols-container .ag-row[row-index='0']").inner_text()
                assert f"candidate-{top['id']}" in name
            finally:
                browser.close()
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGINT)
            try:
                ui.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()

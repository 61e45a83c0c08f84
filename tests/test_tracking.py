"""MLflow tracking: parent and child runs, the front as tags, step metrics, plots, resume, a store that
is down, the gene summaries, and (slow) `evomerge ui` serving a run's store."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tracking_support import FAILED, GENERATIONS, drive, make_records, make_run_dir

from evomerge.merge.routing import Hop, routing_to_recipe
from evomerge.recipe import Recipe
from evomerge.search.record import CandidateRecord, CandidateStatus
from evomerge.search.report import RunReport
from evomerge.search.rundir import RunDir
from evomerge.tracking import Tracker
from evomerge.tracking.store import DB_FILE, RunLink, make_client
from evomerge.tracking.summary import flatten, gene_summary, mlflow_key


def children(client, link: RunLink) -> dict[int, object]:
    runs = client.search_runs(
        [link.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{link.parent_run_id}'", max_results=1000
    )
    by_id = {int(r.data.tags["candidate_id"]): r for r in runs}
    assert len(by_id) == len(runs), "one child run per candidate"
    return by_id


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def expected_hypervolumes(config: dict, records: list[CandidateRecord]) -> list[float]:
    return [RunReport(config, [r for r in records if r.generation <= g]).hypervolume() for g in range(len(GENERATIONS))]


# --- a whole search -----------------------------------------------------------------------------------


def test_a_search_is_a_parent_run_with_a_child_run_per_candidate(tmp_path, empty_store) -> None:
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    tracker = Tracker(config, run_dir.path)
    drive(tracker, run_dir, records)
    assert tracker.stats["failures"] == 0

    link = RunLink.read(run_dir.path)
    assert link is not None and link.tracking_uri == f"sqlite:///{(run_dir.path / DB_FILE).resolve()}"
    client = make_client(link.tracking_uri)
    parent = client.get_run(link.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "tracking-test"
    params = parent.data.params
    assert params["optimizer.name"] == "nsga2" and params["seed"] == "7"
    assert params["objectives.1.task"] == "zoo_sort"
    assert params["search_space.parameters.weight.high"] == "2.0"
    assert json.loads(params["search_space.models"]) == ["/m/reverse", "/m/sort"]
    import evomerge

    assert params["evomerge_version"] == evomerge.__version__
    assert {"run.yaml", "search_space.yaml", "front.csv", "plots/front.png", "plots/weights.png"} <= artifact_paths(
        client, parent.info.run_id
    )
    # run.yaml is the run dir's file, verbatim
    assert (
        Path(client.download_artifacts(parent.info.run_id, "run.yaml", str(tmp_path))).read_text()
        == (run_dir.path / "run.yaml").read_text()
    )

    kids = children(client, link)
    assert sorted(kids) == list(range(20))
    for cid, run in kids.items():
        record = records[cid]
        assert run.data.tags["status"] == record.status.value
        assert run.data.params["candidate_id"] == str(cid)
        assert run.data.params["recipe_hash"] == record.recipe_hash
        assert run.data.params["worker"] == record.worker
        assert run.data.params["method"] == "ties"
        assert run.data.metrics["generation"] == record.generation
        assert run.data.metrics["seconds"] == record.seconds
        for label, value in record.objectives.items():
            assert run.data.metrics[label] == pytest.approx(value)
        assert artifact_paths(client, run.info.run_id) == {"recipe.yaml"}
    failed = kids[FAILED]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["reason"] == "worker lost: out of memory"
    assert not {"reverse", "sort"} & set(failed.data.metrics)
    assert all(run.info.status == "FINISHED" for cid, run in kids.items() if cid != FAILED)

    # the recipe artifact is the recipe, and the gene summary its per-model means
    some = kids[3]
    text = Path(client.download_artifacts(some.info.run_id, "recipe.yaml", str(tmp_path / "r3"))).read_text()
    assert Recipe.from_yaml(text) == Recipe.from_dict(records[3].recipe)
    assert some.data.params["weight.reverse"] == gene_summary(records[3].recipe)["weight.reverse"]

    # the front is tagged, exactly
    front = {r.id for r in RunReport(config, records).front()}
    assert front and {cid for cid, run in kids.items() if run.data.tags["pareto"] == "true"} == front
    front_csv = (
        Path(client.download_artifacts(parent.info.run_id, "front.csv", str(tmp_path / "f"))).read_text().splitlines()
    )
    assert front_csv[0].startswith("id,generation,reverse,sort")
    assert {int(line.split(",")[0]) for line in front_csv[1:]} == front

    # step metrics: one per generation, equal to the front of the records up to it
    history = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        expected_hypervolumes(config, records)
    )
    best = client.get_metric_history(parent.info.run_id, "best/sort")
    assert [m.step for m in best] == [0, 1, 2]
    assert best[-1].value == max(r.objectives["sort"] for r in records if r.ok)


def test_the_final_front_plot_shows_every_candidate(tmp_path, empty_store, monkeypatch) -> None:
    """Plots are throttled while a search runs (PLOT_SHARE), but at close they show the final front,
    as front.csv does; the plot once stopped at the candidates of an early generation."""
    import evomerge.tracking.plots as plots
    import evomerge.tracking.tracker as tracker_module

    drawn: list[int] = []
    real = plots.plot_front
    monkeypatch.setattr(plots, "plot_front", lambda *a, **k: (drawn.append(len(k["ids"])), real(*a, **k))[1])
    monkeypatch.setattr(tracker_module, "PLOT_SHARE", 0.0)  # after the first drawing, only close may draw
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    drive(Tracker(config, run_dir.path), run_dir, records)
    assert drawn and drawn[-1] == sum(1 for r in records if r.ok)


def test_leaving_the_front_flips_the_tag(tmp_path, empty_store) -> None:
    run_dir, config, _ = make_run_dir(tmp_path / "run", empty_store)
    base = [r.replace(status=CandidateStatus.OK, reason=None, generation=0) for r in make_records()[:3]]
    base[0] = base[0].replace(objectives={"reverse": 0.5, "sort": 0.5})
    base[1] = base[1].replace(objectives={"reverse": 0.1, "sort": 0.1})
    later = base[2].replace(id=2, generation=1, objectives={"reverse": 0.9, "sort": 0.9})
    tracker = Tracker(config, run_dir.path)
    drive(tracker, run_dir, base[:2] + [later])
    link = RunLink.read(run_dir.path)
    kids = children(make_client(link.tracking_uri), link)
    assert {cid: run.data.tags["pareto"] for cid, run in kids.items()} == {0: "false", 1: "false", 2: "true"}


# --- resume ------------------------------------------------------------------------------------------


def test_resume_reattaches_to_the_parent_and_logs_only_what_is_missing(tmp_path, empty_store) -> None:
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    first = Tracker(config, run_dir.path)
    drive(first, run_dir, [r for r in records if r.generation < 2], close=False)
    assert first.flush(timeout=120)
    link = RunLink.read(run_dir.path)
    client = make_client(link.tracking_uri)
    assert len(children(client, link)) == 16
    # the search dies: generation 2 reaches evaluations.jsonl, and only one child run was begun
    for record in records[16:]:
        run_dir.append(record)
    half = client.create_run(link.experiment_id, tags={"mlflow.parentRunId": link.parent_run_id, "candidate_id": "17"})

    second = Tracker(config, run_dir.path)
    second.start(resume=True)
    second.sync()
    second.on_generation(2)
    second.close()
    assert RunLink.read(run_dir.path) == link  # the same parent run
    kids = children(client, link)
    assert sorted(kids) == list(range(20))
    assert kids[17].info.run_id == half.info.run_id  # the begun child was finished, not duplicated
    assert kids[17].data.metrics["reverse"] == pytest.approx(records[17].objectives["reverse"])
    assert client.get_run(link.parent_run_id).info.status == "FINISHED"
    history = client.get_metric_history(link.parent_run_id, "hypervolume")
    assert sorted(m.step for m in history) == [0, 1, 2]
    front = {r.id for r in RunReport(config, records).front()}
    assert {cid for cid, run in kids.items() if run.data.tags["pareto"] == "true"} == front
    # nothing left to do
    assert Tracker(config, run_dir.path).sync() == 0
    assert len(children(client, link)) == 20


def test_a_full_queue_drops_records_from_memory_not_from_mlflow(tmp_path, empty_store) -> None:
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    tracker = Tracker(config, run_dir.path, max_queue=3, flush_every=1000)
    for record in records:  # queued before the worker exists: the queue overflows
        run_dir.append(record)
        tracker.on_record(record)
    assert len(tracker._pending) == 3
    tracker.start(resume=False)
    tracker.on_generation(2)
    tracker.close()
    link = RunLink.read(run_dir.path)
    assert sorted(children(make_client(link.tracking_uri), link)) == list(range(20))


# --- a store that is down -------------------------------------------------------------------------------


def test_an_unreachable_server_never_stops_the_search(tmp_path, empty_store, monkeypatch, caplog) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, config, records = make_run_dir(tmp_path / "run")
    down = Tracker(config, run_dir.path, uri="http://127.0.0.1:9")
    began = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="evomerge.tracking"):
        drive(down, run_dir, records)  # raises nothing
    assert time.perf_counter() - began < 60
    assert down.stats["failures"] >= 1 and down.stats["logged"] == 0
    assert any("http://127.0.0.1:9" in m for m in caplog.messages)
    assert RunLink.read(run_dir.path) is None

    # the next start (a resume, on a store that works) catches up from evaluations.jsonl
    source, target = sqlite3.connect(empty_store), sqlite3.connect(run_dir.path / DB_FILE)
    source.backup(target)
    source.close()
    target.close()
    up = Tracker(config, run_dir.path)
    up.start(resume=True)
    up.sync()
    up.close()
    link = RunLink.read(run_dir.path)
    client = make_client(link.tracking_uri)
    kids = children(client, link)
    assert sorted(kids) == list(range(20))
    assert kids[FAILED].info.status == "FAILED"
    # steps: the complete generations when syncing, the last one when closing
    assert sorted(m.step for m in client.get_metric_history(link.parent_run_id, "hypervolume")) == [0, 1, 2]
    assert Tracker(config, run_dir.path).sync() == 0


# --- with the real driver ------------------------------------------------------------------------------


def test_the_search_driver_in_two_pieces(random_family, tmp_path, empty_store) -> None:
    from evomerge.runtime import make_executor
    from evomerge.search.config import resolve_run_config
    from evomerge.search.driver import Search

    config = {
        "name": "quad",
        "search_space": {
            "models": [str(random_family["a"]), str(random_family["b"])],
            "base_model": str(random_family["base"]),
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0, "high": 1}},
            "granularity": "layer",
        },
        "objectives": [
            {"task": "t1", "metric": "acc", "name": "first", "direction": "maximize"},
            {"task": "t2", "metric": "acc", "name": "second", "direction": "maximize"},
        ],
        "optimizer": {"name": "nsga2", "population": 6, "budget": 24, "seed": 3},
        "runtime": {"workers": 0},
    }
    run = resolve_run_config(config, base_dir=tmp_path)
    path = tmp_path / "run"
    path.mkdir()
    source, target = sqlite3.connect(empty_store), sqlite3.connect(path / DB_FILE)
    source.backup(target)
    source.close()
    target.close()

    def piece(budget: int | None, resume: bool, status: str) -> None:
        tracker = Tracker.from_config(run.to_dict(), path)
        tracker.start(resume=resume)
        executor = make_executor(run, evaluator_factory="fake_evaluators:quadratic")
        try:
            Search(
                run,
                RunDir(path),
                executor,
                budget=budget,
                on_record=tracker.on_record,
                on_generation=tracker.on_generation,
            ).execute(resume=resume)
        finally:
            executor.shutdown()
            tracker.close(status)

    piece(7, False, "KILLED")  # stops one candidate into generation 1
    link = RunLink.read(path)
    client = make_client(link.tracking_uri)
    assert client.get_run(link.parent_run_id).info.status == "KILLED"
    assert sorted(children(client, link)) == list(range(7))
    piece(None, True, "FINISHED")
    assert RunLink.read(path) == link
    parent = client.get_run(link.parent_run_id)
    assert parent.info.status == "FINISHED"
    records = list(RunDir(path).records())
    kids = children(client, link)
    assert sorted(kids) == list(range(24))
    report = RunReport(run.to_dict(), records)
    assert {cid for cid, r in kids.items() if r.data.tags["pareto"] == "true"} == {r.id for r in report.front()}
    history = client.get_metric_history(link.parent_run_id, "hypervolume")
    assert {m.step for m in history} == {0, 1, 2, 3}
    assert parent.data.metrics["hypervolume"] == pytest.approx(report.hypervolume())
    assert parent.data.metrics["candidates"] == 24
    assert kids[0].data.params["layers"] == "3" and "weight.a" in kids[0].data.params


def test_a_sweep_logs_its_fit_and_its_plot(random_family, tmp_path, empty_store) -> None:
    """A finite optimizer's findings reach MLflow: optimizer.json (points, fit, pick) and its plot, as an
    artifact and as an image."""
    from search_support import run_config

    from evomerge.runtime import make_executor
    from evomerge.search.config import resolve_run_config
    from evomerge.search.driver import Search

    config = run_config(random_family, tmp_path)
    config["search_space"].update(models=[str(random_family["a"])], granularity="model")
    config["optimizer"].update(name="sweep", grid=4)
    run = resolve_run_config(config, base_dir=tmp_path)
    path = tmp_path / "run"
    path.mkdir()
    source, target = sqlite3.connect(empty_store), sqlite3.connect(path / DB_FILE)
    source.backup(target)
    source.close()
    target.close()
    tracker = Tracker.from_config(run.to_dict(), path)
    tracker.start(resume=False)
    executor = make_executor(run, evaluator_factory="fake_evaluators:quadratic")
    try:
        summary = Search(run, RunDir(path), executor, on_record=tracker.on_record).execute()
    finally:
        executor.shutdown()
        tracker.close("FINISHED")
    assert summary.stopped == "done"
    link = RunLink.read(path)
    client = make_client(link.tracking_uri)
    assert {"optimizer.json", "plots/optimizer.png"} <= artifact_paths(client, link.parent_run_id)
    logged = json.loads(
        Path(client.download_artifacts(link.parent_run_id, "optimizer.json", str(tmp_path))).read_text()
    )
    assert logged == RunDir(path).read_optimizer_summary() and logged["pick"] == pytest.approx([0.5], abs=1e-3)
    assert any("optimizer" in p for p in artifact_paths(client, link.parent_run_id, "images"))


# --- pieces -----------------------------------------------------------------------------------------


def test_gene_summaries() -> None:
    scalar = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/m/base",
            "models": [
                {"model": "/m/a", "parameters": {"weight": 0.5}},
                {"model": "/x/a", "parameters": {"weight": [0.0, 1.0, 2.0]}},
            ],
            "parameters": {"normalize": True},
        }
    )
    summary = gene_summary(scalar)
    assert summary["method"] == "task_arithmetic"
    assert summary["weight.0-a"] == "0.5" and summary["weight.1-a"] == "1.0"  # same short name: indexed
    assert summary["normalize"] == "True" and summary["layers"] == "3"

    split = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "models": [
                {
                    "model": "/m/a",
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": [1.0, 3.0]}, {"value": 0.0}],
                        "density": 0.5,
                    },
                }
            ],
        }
    )
    summary = gene_summary(split.to_dict())
    assert summary["weight.a"] == "1.0"  # mean over attention (1, 3) and MLP (0, 0) tensors
    assert summary["density.a"] == "0.5"

    route = routing_to_recipe([Hop("/m/a", 0, 1.0), Hop("/m/b", 1, 2.0), Hop("/m/a", 1, 1.0)], check=False)
    summary = gene_summary(route)
    assert summary["method"] == "passthrough"
    assert summary["path_length"] == "3" and summary["models_used"] == "a,b"
    assert summary["hops.a"] == "2" and summary["hops.b"] == "1"
    assert summary["path"] == "a:0 b:1 a:1"


def test_config_params_fit_mlflow() -> None:
    params = flatten({"a": {"b": 1, "list": [1, 2]}, "objectives": [{"task": "t"}], "long": "x" * 10_000, "none": None})
    assert params == {
        "a.b": "1",
        "a.list": "[1,2]",
        "objectives.0.task": "t",
        "long": "x" * 5997 + "...",
        "none": "None",
    }
    assert mlflow_key("zoo_reverse/acc") == "zoo_reverse/acc"
    assert mlflow_key("/a//b/../c@split") == "a/b/c_split"


def test_plots_for_one_two_and_many_objectives(tmp_path) -> None:
    from evomerge.tracking.plots import plot_front, plot_weights

    rng = np.random.default_rng(0)
    for k in (1, 2, 4):
        values = rng.random((12, k))
        path = plot_front(
            tmp_path / f"front{k}.png",
            values,
            [0, 3],
            [f"o{j}" for j in range(k)],
            ["maximize"] * (k - 1) + ["minimize"],
            generations=list(range(12)),
        )
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = make_records()[:3]
    assert plot_weights(tmp_path / "w.png", records).read_bytes()[:4] == b"\x89PNG"
    route = routing_to_recipe([Hop("/m/a", 0, 1.0)], check=False)
    assert (
        plot_weights(
            tmp_path / "none.png",
            [CandidateRecord(id=0, generation=0, status=CandidateStatus.OK, recipe=route.to_dict())],
        )
        is None
    )


# --- evomerge ui -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_runs_of_a_run_dir(tmp_path, empty_store) -> None:
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    drive(Tracker(config, run_dir.path), run_dir, records)
    link = RunLink.read(run_dir.path)
    port = _free_port()
    stdout, stderr = tmp_path / "ui.out", tmp_path / "ui.err"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(stdout, "w") as out, open(stderr, "w") as err:
        ui = subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "ui", "--run-dir", str(run_dir.path), "--port", str(port)],
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    server_pid = None
    try:
        body = json.dumps({"experiment_ids": [link.experiment_id], "max_results": 100}).encode()
        deadline, runs = time.monotonic() + 180, None
        while time.monotonic() < deadline and ui.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    runs = json.loads(response.read())["runs"]
                    break
            except OSError:
                time.sleep(1)
        assert runs is not None, stderr.read_text()
        assert len(runs) == 21  # the parent and 20 candidates
        assert {r["info"]["run_uuid"] for r in runs} >= {link.parent_run_id}
        deadline = time.monotonic() + 30
        while f"/#/experiments/{link.experiment_id}" not in stdout.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stdout.read_text().strip() == (
            f"http://127.0.0.1:{port}/#/experiments/{link.experiment_id}/runs"
            f"?viewStateShareKey=evomerge-{link.parent_run_id}"
        )
        server_pid = int(stderr.read_text().split("(pid ")[1].split(",")[0])
        # the plots are served too
        url = f"http://127.0.0.1:{port}/get-artifact?path=plots/front.png&run_uuid={link.parent_run_id}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read()[:4] == b"\x89PNG"
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        assert ui.wait(60) == 0
        with pytest.raises(ProcessLookupError):  # the server's process group is gone with it
            os.killpg(server_pid, 0)
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_experiment_opens_on_runs_and_the_search_saves_its_leaderboard(tmp_path, empty_store) -> None:
    from evomerge.tracking.leaderboard import EXPERIMENT_KIND_TAG, SHARED_VIEW_PREFIX, view_key

    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    drive(Tracker(config, run_dir.path), run_dir, records)
    link = RunLink.read(run_dir.path)
    client = make_client(link.tracking_uri)
    tags = client.get_experiment(link.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    view = json.loads(tags[SHARED_VIEW_PREFIX + view_key(link.parent_run_id)])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{link.parent_run_id}'"
    assert view["orderByKey"] == "metrics.`score`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:3] == ["metrics.`reverse`", "metrics.`sort`", "metrics.`score`"]
    # the filter lists exactly the candidates, and score is the weighted score the `best` pick uses
    kids = client.search_runs([link.experiment_id], filter_string=view["searchFilter"], max_results=100)
    assert sorted(int(r.data.tags["candidate_id"]) for r in kids) == [r.id for r in records]
    report = RunReport(config, records)
    top = max(kids, key=lambda r: r.data.metrics.get("score", -math.inf))
    assert int(top.data.tags["candidate_id"]) == report.best().id
    # a run page shows the final plots: images logged on the parent
    assert client.get_run(link.parent_run_id).data.tags.get("mlflow.loggedImages") == "True"
    assert {"images"} <= {a.path for a in client.list_artifacts(link.parent_run_id)}


@pytest.mark.slow
def test_a_tracking_server_stopped_mid_search_and_restarted_gets_every_candidate_once(
    random_family, tmp_path, empty_store, monkeypatch
) -> None:
    """`mlflow server` on loopback as the tracking URI; stopped after candidate 6, started again after
    candidate 14: the search never stops, and every candidate ends up in MLflow exactly once."""
    from search_support import run_config as search_config

    from evomerge.runtime import make_executor
    from evomerge.search.config import resolve_run_config
    from evomerge.search.driver import Search
    from evomerge.tracking.server import MlflowServer, port_is_free

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("EVOMERGE_FAKE_MEDIAN_S", "0.3")  # each candidate sleeps 0.3 s: the outage spans several
    monkeypatch.setenv("EVOMERGE_FAKE_SIGMA", "0")
    store = tmp_path / "server" / DB_FILE
    store.parent.mkdir()
    source, target = sqlite3.connect(empty_store), sqlite3.connect(store)
    source.backup(target)
    source.close()
    target.close()
    server = MlflowServer(f"sqlite:///{store}", port=_free_port(), cwd=store.parent)
    server.start()
    server.wait_ready()
    try:
        run = resolve_run_config(search_config(random_family, tmp_path), base_dir=tmp_path)
        path = tmp_path / "run"
        tracker = Tracker.from_config(run.to_dict(), path, uri=server.url, flush_every=2)
        outage: list[float] = []

        def on_record(record) -> None:
            tracker.on_record(record)
            if record.id == 6:
                server.stop()
                outage.append(time.monotonic())
            if record.id == 14:
                deadline = time.monotonic() + 30
                while not port_is_free(server.port) and time.monotonic() < deadline:
                    time.sleep(0.2)
                server.start()
                server.wait_ready()
                outage.append(time.monotonic())

        executor = make_executor(run, evaluator_factory="fake_evaluators:slow_quadratic")
        tracker.start(resume=False)
        try:
            summary = Search(
                run, RunDir(path), executor, on_record=on_record, on_generation=tracker.on_generation
            ).execute()
        finally:
            executor.shutdown()
            tracker.close()
        assert summary.evaluated == 24 and summary.stopped == "budget"
        assert len(outage) == 2 and tracker.stats["failures"] >= 1  # the outage was real and was noticed
        link = RunLink.read(path)
        client = make_client(server.url)
        runs = client.search_runs(
            [link.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{link.parent_run_id}'", max_results=500
        )
        ids = [int(r.data.tags["candidate_id"]) for r in runs]
        assert sorted(ids) == list(range(24))  # every candidate, none twice
        assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        server.stop()


def test_screen_scores_are_logged_apart_and_never_ranked(tmp_path, empty_store) -> None:
    """A multi-fidelity run: screened candidates' values go to ``screen.<metric>`` (tag fidelity=screen),
    never to the objective's own column, so neither the leaderboard's sort, the front tags nor the
    best-so-far step metrics see them; promotions carry ``promoted_from``."""
    run_dir, config, records = make_run_dir(tmp_path / "run", empty_store)
    screened = {1, 2, 9}  # screened only; candidate 3 is a promotion of 2
    records = [
        r.replace(fidelity="screen", objectives={k: 0.999 for k in r.objectives}) if r.id in screened else r
        for r in records
    ]
    records[3] = records[3].replace(promoted_from=2)
    tracker = Tracker(config, run_dir.path)
    drive(tracker, run_dir, records)
    link = RunLink.read(run_dir.path)
    client = make_client(link.tracking_uri)
    kids = children(client, link)
    for cid in screened:
        run = kids[cid]
        assert run.data.tags["fidelity"] == "screen" and run.data.tags["pareto"] == "false"
        assert run.data.metrics["screen.reverse"] == pytest.approx(0.999) and "reverse" not in run.data.metrics
    assert kids[3].data.tags["promoted_from"] == "2" and kids[3].data.tags["fidelity"] == "full"
    best = client.get_metric_history(link.parent_run_id, "best/reverse")
    full = [r.objectives["reverse"] for r in records if r.ok and r.full]
    assert best[-1].value == pytest.approx(max(full)) and best[-1].value < 0.999

"""Export: picks from a run, and exported YAML that mergekit reproduces tensor for tensor."""

from __future__ import annotations

import json

import pytest
from search_support import search
from test_mergekit_parity import assert_same_model, run_mergekit
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge.engine import merge_to_disk
from evomerge.recipe import Recipe
from evomerge.search.picks import PickError, knee, pick
from evomerge.search.report import RunReport


@pytest.fixture(scope="module")
def ps_run(random_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("ps_run")
    search(random_family, root, root / "run", **{"optimizer.budget": 18})
    return root / "run"


@pytest.fixture(scope="module")
def dfs_run(random_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("dfs_run")
    space = {
        "kind": "dfs",
        "models": [str(random_family["a"]), str(random_family["b"])],
        "repeats": 2,
        "max_path_length": 6,
    }
    search(random_family, root, root / "run", **{"search_space": space, "optimizer.budget": 18})
    return root / "run"


def test_picks(ps_run) -> None:
    report = RunReport.load(ps_run)
    front = report.front()
    assert knee(report) in front
    first, second = report.labels
    best_first = pick(report, f"best:{first}")
    assert best_first.objectives[first] == max(r.objectives[first] for r in report.ok)
    assert pick(report, "3").id == 3
    assert report.config["optimizer"]["name"] == "nsga2"
    assert pick(report, "auto") == knee(report)  # NSGA-II, no choice of its own: auto is the knee
    # best: by the optimizer's scalarization (weighted sum here; the weakest objective with scalarize: worst)
    scores = {r.id: sum(r.objectives.values()) for r in report.ok}
    assert scores[pick(report, "best").id] == max(scores.values())
    report.config["optimizer"]["scalarize"] = "worst"
    weakest = {r.id: min(r.objectives.values()) for r in report.ok}
    assert weakest[pick(report, "best").id] == max(weakest.values())
    report.config["optimizer"]["name"] = "cma"
    assert pick(report, "auto") == pick(report, "best")  # a scalarizing CMA-ES run: auto is its best
    with pytest.raises(PickError, match="no objective 'nope'"):
        pick(report, "best:nope")
    with pytest.raises(PickError, match="no such candidate"):
        pick(report, "999")
    with pytest.raises(PickError, match="use knee, best, best:OBJECTIVE, optimizer, auto or a candidate id"):
        pick(report, "favourite")


@pytest.mark.parametrize("run", ["ps_run", "dfs_run"])
def test_exported_recipes_are_reproduced_by_mergekit(request, run, tmp_path) -> None:
    run_dir = request.getfixturevalue(run)
    runner = CliRunner()
    out = tmp_path / "knee.yaml"
    result = runner.invoke(
        app, ["export", str(run_dir), "--pick", "knee", "-o", str(out), "--front-dir", str(tmp_path / "front")]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "front" / "index.json").read_text())
    assert [m["id"] for m in index["front"]] == [r.id for r in RunReport.load(run_dir).front()]
    assert sum(m["knee"] for m in index["front"]) == 1

    recipe = Recipe.load(out)
    if run == "dfs_run":
        assert recipe.merge_method == "passthrough" and recipe.slices
    ours = merge_to_disk(recipe, tmp_path / "ours")
    theirs = run_mergekit(recipe.to_dict(), tmp_path / "mergekit")
    assert_same_model(ours, theirs)


def test_export_errors(ps_run, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(ps_run)])
    assert result.exit_code == 2 and "-o FILE" in result.output
    result = runner.invoke(app, ["export", str(tmp_path), "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_ps_dfs_chain_exports_as_stages_and_merges(random_family, ps_run, tmp_path, monkeypatch) -> None:
    from evomerge.merge.routing import recipe_to_routing
    from evomerge.recipe import load_recipe_chain, substitute_models

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    space = {
        "kind": "dfs",
        "models": ["ps", str(random_family["b"])],
        "stages": {"ps": {"run": str(ps_run), "pick": "knee"}},
        "repeats": 1,
        "max_path_length": 4,
    }
    from search_support import run_config

    from evomerge.search.config import resolve_run_config

    # resolving (validating) the config writes nothing; the search merges the stage as its first step
    run = resolve_run_config(run_config(random_family, tmp_path, **{"search_space": space}), base_dir=tmp_path)
    assert list(run.stages) and not (tmp_path / "cache").exists()
    search(random_family, tmp_path, tmp_path / "dfs", **{"search_space": space, "optimizer.budget": 12})
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "stages").iterdir()] == ["ps"]
    out = tmp_path / "chain.yaml"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "dfs"), "--pick", "knee", "-o", str(out)])
    assert result.exit_code == 0, result.output
    chain = load_recipe_chain(out)
    knee_ps = Recipe.from_dict(knee(RunReport.load(ps_run)).recipe)
    assert len(chain) == 2 and chain[0].name == "ps"
    assert chain[0].model_copy(update={"name": None}) == knee_ps
    assert recipe_to_routing(chain[1]) is not None and "ps" in chain[1].referenced_models()

    merged = CliRunner().invoke(app, ["merge", str(out), str(tmp_path / "merged"), "-q"])
    assert merged.exit_code == 0, merged.output
    # the same two stages merged one by one, by mergekit
    stage = run_mergekit(knee_ps.to_dict(), tmp_path / "mk_stage")
    final = substitute_models(chain[1].model_copy(update={"name": None}), {"ps": str(stage)})
    assert_same_model(tmp_path / "merged", run_mergekit(final.to_dict(), tmp_path / "mk_final"))

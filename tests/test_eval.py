"""Proxy evaluation: fast backend == lm-eval backend, in-memory == on-disk, failures isolated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective, TaskError
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.routing import Hop, routing_to_recipe
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def zoo(zoo_dir) -> dict:
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    return {
        "dir": zoo_dir,
        "base": str(zoo_dir / manifest["base"]),
        "models": {k: str(zoo_dir / v) for k, v in manifest["models"].items()},
        "tasks": manifest["tasks"],
        "include": str(zoo_dir / manifest["include_path"]),
    }


def objectives(zoo, split: str = "search", limit: int | None = 40) -> list[Objective]:
    out = []
    for _skill, task in zoo["tasks"].items():
        out.append(Objective(task=task, metric="acc", split=split, limit=limit))
        out.append(Objective(task=task, metric="perplexity", split=split, limit=limit))
    return out


def task_arithmetic(zoo, weight: float = 0.7) -> Recipe:
    return Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": zoo["base"],
            "models": [{"model": m, "parameters": {"weight": weight}} for m in zoo["models"].values()],
            "dtype": "float32",
        }
    )


@pytest.fixture(scope="module")
def fast(zoo) -> CandidateEvaluator:
    return CandidateEvaluator(objectives(zoo), include_paths=[zoo["include"]], backend="fast")


def assert_same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for label in a:
        if label.endswith("/acc"):
            assert a[label] == b[label], label
        else:
            assert a[label] == pytest.approx(b[label], rel=1e-4), label


def test_fast_backend_equals_lm_eval_backend(zoo, fast) -> None:
    reference = CandidateEvaluator(objectives(zoo), include_paths=[zoo["include"]], backend="lm-eval")
    specialist = next(iter(zoo["models"].values()))
    for target in (specialist, task_arithmetic(zoo)):

        def evaluate(e, target=target):
            return e.evaluate_checkpoint(target) if isinstance(target, str) else e.evaluate(target)

        ours, theirs = evaluate(fast), evaluate(reference)
        assert ours.ok and theirs.ok, (ours.reason, theirs.reason)
        assert_same_scores(ours.objectives, theirs.objectives)
    # and the numbers mean something: the specialist is good at its own skill
    skill, model = next(iter(zoo["models"].items()))
    own = fast.evaluate_checkpoint(model).objectives[f"{zoo['tasks'][skill]}/acc"]
    assert own >= 0.9


def test_in_memory_recipe_equals_saved_checkpoint(zoo, fast, tmp_path) -> None:
    recipe = task_arithmetic(zoo, 0.6)
    in_memory = fast.evaluate(recipe)
    saved = fast.evaluate_checkpoint(merge_to_disk(recipe, tmp_path / "merged"))
    assert in_memory.ok and saved.ok
    assert in_memory.objectives == saved.objectives


def test_identical_recipes_are_scored_once(zoo, fast) -> None:
    recipe = task_arithmetic(zoo, 0.55)
    first = fast.evaluate(recipe)
    again = fast.evaluate(Recipe.from_yaml(recipe.to_yaml()))
    assert not first.cached and again.cached
    assert again.objectives == first.objectives and again.recipe_hash == first.recipe_hash


def test_routings_with_other_layer_counts(zoo, fast, tmp_path) -> None:
    a, b = list(zoo["models"].values())[:2]
    hops = [Hop(a, 0), Hop(a, 1, 1.2), Hop(b, 1, 0.8), Hop(b, 2), Hop(a, 2), Hop(b, 3)]
    routed = routing_to_recipe(hops)
    result = fast.evaluate(routed)
    assert result.ok, result.reason
    saved = fast.evaluate_checkpoint(merge_to_disk(routed, tmp_path / "routed"))
    assert saved.objectives == result.objectives
    # back to the 4-layer resident model: still right
    plain = task_arithmetic(zoo, 0.65)
    assert (
        fast.evaluate(plain).objectives == fast.evaluate_checkpoint(merge_to_disk(plain, tmp_path / "plain")).objectives
    )


def test_failures_are_results_not_exceptions(zoo, fast, monkeypatch) -> None:
    a, b = list(zoo["models"].values())[:2]
    nan_weights = Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": -1.0}}],
        }
    )
    result = fast.evaluate(nan_weights)
    assert result.status == "failed" and "NaN or Inf" in result.reason

    missing = Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": "/nonexistent/model", "parameters": {"weight": 1}}]}
    )
    result = fast.evaluate(missing)
    assert result.status == "failed" and "does not exist" in result.reason

    # with the weight check out of the way, the NaN logits that follow are caught by the scorer
    import evomerge.eval.evaluator as evaluator_module

    monkeypatch.setattr(evaluator_module, "_check_finite", lambda model: None)
    also_nan = Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 2.0}}, {"model": b, "parameters": {"weight": -2.0}}],
        }
    )
    result = fast.evaluate(also_nan)
    assert result.status == "failed" and "NaN" in result.reason
    monkeypatch.undo()

    # the evaluator is still fine afterwards
    assert fast.evaluate(task_arithmetic(zoo, 0.75)).ok


def test_task_errors_name_what_is_valid(zoo) -> None:
    task = next(iter(zoo["tasks"].values()))
    with pytest.raises(TaskError, match="no split 'validation'.*valid: "):
        CandidateEvaluator([Objective(task=task, split="validation")], include_paths=[zoo["include"]])
    with pytest.raises(TaskError, match="no metric 'bleu'"):
        CandidateEvaluator([Objective(task=task, metric="bleu")], include_paths=[zoo["include"]])
    with pytest.raises(TaskError, match="unknown task"):
        CandidateEvaluator([Objective(task="zoo_nonexistent_task_xyz")], include_paths=[zoo["include"]])


def test_splits_and_seeded_subsets(zoo) -> None:
    task = next(iter(zoo["tasks"].values()))
    evaluator = CandidateEvaluator(
        [
            Objective(task=task, split="search", name="search"),
            Objective(task=task, split="test", name="test"),
            Objective(task=task, split="test", limit=10, subset_seed=3, name="subset"),
        ],
        include_paths=[zoo["include"]],
    )
    sizes = {p.objective_labels[0]: len(p.doc_ids) for p in evaluator.prepared}
    subset = next(p for p in evaluator.prepared if p.objective_labels == ["subset"])
    assert sizes["subset"] == 10 and subset.doc_ids != list(range(10)) and subset.doc_ids == sorted(subset.doc_ids)
    assert sizes["search"] != sizes["test"]


def test_cli_eval_table_and_json(zoo) -> None:
    skill, model = next(iter(zoo["models"].items()))
    runner = CliRunner()
    args = ["eval", model, "--tasks", zoo["tasks"][skill], "--include-path", zoo["include"], "--limit", "30"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["status"] == "ok" and payload["objectives"][f"{zoo['tasks'][skill]}/acc"] >= 0.9
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "acc" in table.stdout
    bad = runner.invoke(app, ["eval", model, "--tasks", "nope_task", "--include-path", zoo["include"]])
    assert bad.exit_code == 2 and "unknown task" in bad.output


@pytest.mark.slow
def test_matches_plain_lm_eval_cli(zoo, tmp_path) -> None:
    """Our numbers for a saved checkpoint equal those of the plain `lm-eval` CLI on the same directory."""
    skill, model = list(zoo["models"].items())[1]
    tasks = ",".join(zoo["tasks"].values())
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model},dtype=float32",
        "--include_path",
        zoo["include"],
        "--tasks",
        tasks,
        "--device",
        "cpu",
        "--batch_size",
        "32",
        "--output_path",
        str(tmp_path / "lm_eval_out"),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    results_file = next((tmp_path / "lm_eval_out").rglob("results*.json"))
    theirs = json.loads(results_file.read_text())["results"]
    evaluator = CandidateEvaluator(
        [
            Objective(task=t, metric=m, split="test", name=f"{t}/{m}")
            for t in zoo["tasks"].values()
            for m in ("acc", "perplexity")
        ],
        include_paths=[zoo["include"]],
    )
    ours = evaluator.evaluate_checkpoint(model).objectives
    for task in zoo["tasks"].values():
        assert ours[f"{task}/acc"] == theirs[task]["acc,none"]
        assert ours[f"{task}/perplexity"] == pytest.approx(theirs[task]["perplexity,none"], rel=1e-4)


def test_the_scoring_dtype_is_a_choice(zoo_dir) -> None:
    """runtime.score_dtype: the resident model in bfloat16 scores (about) as in float32; auto is float32 on CPU."""
    import json

    import torch

    from evomerge.eval.evaluator import CandidateEvaluator, resolve_score_dtype
    from evomerge.eval.tasks import Objective
    from evomerge.recipe import Recipe

    assert resolve_score_dtype("auto", "cpu") == torch.float32
    assert resolve_score_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="runtime.score_dtype: 'int8'"):
        resolve_score_dtype("int8", "cpu")
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo_dir / meta["base"]),
            "models": [
                {"model": str(zoo_dir / meta["models"][s]), "parameters": {"weight": 0.7}} for s in ("latin", "greek")
            ],
        }
    )
    objectives = [
        Objective(task="zoo_latin", metric="acc", limit=40),
        Objective(task="zoo_greek", metric="acc", limit=40),
    ]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        evaluator = CandidateEvaluator(objectives, include_paths=[str(zoo_dir / "tasks")], score_dtype=dtype)
        result = evaluator.evaluate(recipe)
        assert result.ok, result.reason
        (model,) = next(iter(evaluator._models.values()))
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        scores[dtype] = result.objectives
    for label, value in scores["float32"].items():
        assert abs(scores["bfloat16"][label] - value) <= 0.1, scores  # bfloat16 rounding moves a few items at most

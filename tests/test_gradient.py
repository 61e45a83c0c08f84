"""The gradient optimizer (AdaMerging-style): the differentiable merge equals evomerge's own merge, the
fit lowers its loss, and a search with it scores the fit's points, picks the best and resumes without
refitting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.runtime import make_executor
from evomerge.search.config import ConfigError, resolve_run_config
from evomerge.search.driver import Search
from evomerge.search.genome import make_genome
from evomerge.search.gradient import DifferentiableMerge, point_schedule
from evomerge.search.picks import pick
from evomerge.search.registry import make_optimizer
from evomerge.search.report import RunReport
from evomerge.search.rundir import RunDir


def gradient_config(zoo_dir: Path, **optimizer) -> dict:
    return {
        "name": "grad",
        "zoo": str(zoo_dir),
        "search_space": {
            "kind": "ps",
            "models": ["latin", "greek"],
            "base_model": "base",
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 2.0}, "lambda": 0.8},
            "granularity": "layer",
            "split_attn_mlp": True,
        },
        "objectives": [
            {"task": "zoo_latin", "metric": "acc", "split": "search", "limit": 12},
            {"task": "zoo_greek", "metric": "acc", "split": "search", "limit": 12},
        ],
        "optimizer": {"name": "gradient", "steps": 6, "lr": 0.1, "budget": 3, "scalarize": "worst", **optimizer},
        "runtime": {"workers": 0},
    }


@pytest.mark.parametrize("split", ["split_attn_mlp", "split_modules"])
def test_the_differentiable_merge_equals_the_merge_of_the_decoded_recipe(zoo_dir, tmp_path, split) -> None:
    from evomerge.merge.engine import compute_tensor, plan_recipe

    config = gradient_config(zoo_dir)
    config["search_space"]["split_attn_mlp"] = False
    config["search_space"][split] = True
    run = resolve_run_config(config, base_dir=tmp_path)
    genome = make_genome(run.space)
    x = np.random.default_rng(0).uniform(size=genome.dim)
    merge = DifferentiableMerge(run, genome)
    params = merge.params(torch.tensor(x, dtype=torch.float32))
    plan = plan_recipe(genome.decode(x))
    try:
        assert sorted(params) == sorted(job.name for job in plan.jobs)
        for job in plan.jobs:  # per layer, attention apart, embeddings/head at layer 0's value, times lambda
            torch.testing.assert_close(params[job.name], compute_tensor(plan, job), atol=2e-6, rtol=1e-5)
    finally:
        plan.close()


def test_a_gradient_search_fits_scores_its_points_picks_the_best_and_resumes_without_refitting(
    zoo_dir, tmp_path, monkeypatch
) -> None:
    run = resolve_run_config(gradient_config(zoo_dir), base_dir=tmp_path)
    run_dir = tmp_path / "run"
    executor = make_executor(run)
    try:
        summary = Search(run, RunDir(run_dir), executor).execute()
    finally:
        executor.shutdown()
    assert summary.stopped == "done" and summary.evaluated == 3
    found = json.loads((run_dir / "optimizer.json").read_text())
    assert found["optimizer"] == "gradient" and found["point_steps"] == [0, 3, 6]
    assert len(found["losses"]) == 7 and found["losses"][-1] < found["losses"][0]
    assert found["points"][0][:-1] == pytest.approx([0.5] * len(found["genes"]))  # starts at TA weight 1
    report = RunReport.load(run_dir)
    chosen = pick(report, "auto")  # export's default: the best scored point of the fit
    assert chosen.id == found["choice_id"]
    values = [row[-1] for row in found["points"]]
    assert list(chosen.genome) == pytest.approx(found["points"][int(np.argmin(values))][:-1], abs=1e-7)

    from PIL import Image

    from evomerge.tracking.plots import plot_optimizer_summary

    drawn = plot_optimizer_summary(tmp_path / "optimizer.png", found)
    assert drawn is not None and Image.open(drawn).size[0] > 300

    import evomerge.search.gradient as gradient

    def no_refit(*args, **kwargs):
        raise AssertionError("a resumed gradient run must not fit again")

    monkeypatch.setattr(gradient, "fit_task_arithmetic", no_refit)
    executor = make_executor(run)
    try:
        again = Search(run, RunDir(run_dir), executor).execute(resume=True)
    finally:
        executor.shutdown()
    assert again.stopped == "done" and again.evaluated == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "ties"}, "method must be task_arithmetic"),
        ({"parameters": {"weight": {"low": 0, "high": 2}, "lambda": {"low": 0.5, "high": 1}}}, "exactly weight"),
        ({"normalize": True}, "normalize must be false"),
    ],
)
def test_the_gradient_optimizer_refuses_a_space_it_cannot_differentiate(zoo_dir, tmp_path, change, message) -> None:
    config = gradient_config(zoo_dir)
    config["search_space"].update(change)
    with pytest.raises(ConfigError, match=f"optimizer gradient: .*{message}"):
        resolve_run_config(config, base_dir=tmp_path)


def test_steps_and_lr_are_for_the_gradient_optimizer_only(zoo_dir, tmp_path) -> None:
    config = gradient_config(zoo_dir, name="cma")
    config["optimizer"].pop("lr")
    with pytest.raises(ConfigError, match="optimizer.steps: only the gradient optimizer takes it, not cma"):
        resolve_run_config(config, base_dir=tmp_path)


def test_point_schedule_spreads_the_points_over_the_fit() -> None:
    assert point_schedule(100, 11) == list(range(0, 101, 10))
    assert point_schedule(6, 3) == [0, 3, 6]
    assert point_schedule(4, 10) == [0, 1, 2, 3, 4]  # more points than steps: each step once
    assert point_schedule(7, 1) == [7]


def test_the_gradient_optimizer_needs_its_fit() -> None:
    with pytest.raises(ValueError, match="needs its fit"):
        make_optimizer("gradient", 4, 2, population=8, seed=0)


def test_items_in_chunks_give_the_same_fit_as_one_batch(zoo_dir, tmp_path) -> None:
    from evomerge.search.gradient import fit_task_arithmetic

    run = resolve_run_config(gradient_config(zoo_dir), base_dir=tmp_path)
    genome = make_genome(run.space)
    whole = fit_task_arithmetic(run, genome, steps=3, lr=0.1, points=4, scalarize="worst")
    chunked = fit_task_arithmetic(run, genome, steps=3, lr=0.1, points=4, scalarize="worst", batch_tokens=40)
    assert whole.losses == pytest.approx(chunked.losses, rel=1e-4)
    assert np.allclose(whole.points, chunked.points, atol=1e-4)
    assert whole.points[-1] != whole.points[0]  # it moved


def multiple_choice_task(zoo_dir: Path, root: Path) -> Path:
    """zoo_latin as a 4-way multiple-choice task: the right code among three codes one letter off."""
    import random

    rows = [json.loads(line) for line in (zoo_dir / "tasks" / "data" / "latin.search.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    docs = []
    for row in rows[:16]:
        target = row["target"]  # e.g. "hdf." : the distractors change one letter of it
        letters = sorted({c for r in rows for c in r["target"][:-1]})
        choices = [target] + [
            target[:k] + next(c for c in letters[k:] + letters if c != target[k]) + target[k + 1 :] for k in range(3)
        ]
        order = rng.sample(range(4), 4)
        docs.append({"query": row["query"], "choices": [choices[j] for j in order], "label": order.index(0)})
    data = root / "latin_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "zoo_latin_mc.yaml").write_text(
        "task: zoo_latin_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    search: {data}\n"
        "test_split: search\noutput_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    return root


def test_a_multiple_choice_objective_is_fitted_by_the_gold_choices_cross_entropy(zoo_dir, tmp_path) -> None:
    from evomerge.search.gradient import fit_task_arithmetic

    config = gradient_config(zoo_dir)
    config["include_paths"] = [str(multiple_choice_task(zoo_dir, tmp_path))]
    config["objectives"][0] = {"task": "zoo_latin_mc", "metric": "acc", "split": "search"}
    run = resolve_run_config(config, base_dir=tmp_path)
    genome = make_genome(run.space)
    whole = fit_task_arithmetic(run, genome, steps=4, lr=0.1, points=2, scalarize="worst")
    assert 0 < whole.objective_losses[-1][0] < whole.objective_losses[0][0]  # the MC cross-entropy fell
    # chunks of one item (4 choice rows) or less never split an item's choices: the same fit
    chunked = fit_task_arithmetic(run, genome, steps=4, lr=0.1, points=2, scalarize="worst", batch_tokens=8)
    assert whole.losses == pytest.approx(chunked.losses, rel=1e-4)


def test_the_multiple_choice_loss_is_the_cross_entropy_of_the_gold_choice() -> None:
    from evomerge.eval.items import TokenItems

    torch.manual_seed(0)
    logits = torch.randn(5, 2, 7)  # two items: 3 choices, then 2; each choice one scored token
    targets = torch.tensor([[1, 0], [2, 0], [3, 0], [4, 0], [5, 0]])
    mask = torch.tensor([[True, False]] * 5)
    items = TokenItems(
        torch.zeros(5, 2, dtype=torch.long),
        torch.full((5,), 2),
        mask,
        targets,
        torch.tensor([0, 0, 0, 1, 1]),
        torch.tensor([0, 1, 2, 0, 1]),
        torch.tensor([2, 0]),
    )
    ll = torch.log_softmax(logits[:, 0], -1)[torch.arange(5), targets[:, 0]]
    expected = -torch.log_softmax(ll[:3], 0)[2] - torch.log_softmax(ll[3:], 0)[0]
    torch.testing.assert_close(items.loss_sum(logits), expected)
    entropy = sum(-(p * p.log()).sum() for p in (ll[:3].softmax(0), ll[3:].softmax(0)))
    torch.testing.assert_close(items.loss_sum(logits, "entropy"), entropy)  # over the choices, gold unread
    assert [c.count for c in items.chunks(batch_tokens=2)] == [1, 1]  # 1 row per chunk asked, whole items kept


@pytest.mark.slow
def test_with_ray_workers_the_fit_runs_on_a_worker(zoo_dir, tmp_path, local_ray) -> None:
    """On a cluster the driver (a head node) may have no GPU: the fit runs on a worker, with its resources."""
    config = gradient_config(zoo_dir)
    config["runtime"] = {"workers": 1, "timeout": 300}
    run = resolve_run_config(config, base_dir=tmp_path)
    executor = make_executor(run)
    try:
        summary = Search(run, RunDir(tmp_path / "run"), executor).execute()
        assert [w["state"] for w in executor.workers()] == ["idle"]  # the reserved worker is handed back
    finally:
        executor.shutdown()
    found = json.loads((tmp_path / "run" / "optimizer.json").read_text())
    assert found["worker"].startswith("ray-actor-") and summary.evaluated == 3
    assert found["losses"][-1] < found["losses"][0]


def test_the_entropy_loss_reads_no_answer_and_is_the_answer_distributions_entropy(zoo_dir, tmp_path) -> None:
    from evomerge.eval.items import TokenItems
    from evomerge.search.gradient import fit_task_arithmetic

    torch.manual_seed(1)
    logits = torch.randn(3, 3, 5)
    mask = torch.tensor([[False, True, True], [False, False, True], [False, True, True]])
    items = TokenItems(
        torch.zeros(3, 3, dtype=torch.long),
        torch.full((3,), 3),
        mask,
        torch.zeros(3, 3, dtype=torch.long),
        torch.arange(3),
        torch.zeros(3, dtype=torch.long),
        None,
    )
    first = logits[torch.arange(3), torch.tensor([1, 2, 1])]  # where each answer starts
    expected = -(first.softmax(-1) * first.log_softmax(-1)).sum()
    torch.testing.assert_close(items.loss_sum(logits, "entropy"), expected)
    wrong = TokenItems(
        items.ids, items.lengths, mask, torch.randint(0, 5, (3, 3)), items.row_item, items.row_choice, None
    )
    torch.testing.assert_close(wrong.loss_sum(logits, "entropy"), expected)  # the answers are not read

    config = gradient_config(zoo_dir, loss="entropy")
    run = resolve_run_config(config, base_dir=tmp_path)
    fit = fit_task_arithmetic(run, make_genome(run.space), steps=3, lr=0.1, points=2, loss="entropy")
    assert fit.loss == "entropy" and fit.losses[-1] < fit.losses[0]
    with pytest.raises(ConfigError, match="optimizer.loss: only the gradient optimizer"):
        resolve_run_config(gradient_config(zoo_dir, name="cma", loss="entropy", steps=None, lr=None), base_dir=tmp_path)

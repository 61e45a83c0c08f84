"""Data-aware merges (fisher, regmean): each method against an independent computation, the statistics
against the model's own activations and gradients, recipes with a data: section through `evomerge merge`
(cached statistics) and the in-memory evaluator, and a search over RegMean's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from evomerge.eval.items import TokenItems
from evomerge.eval.statistics import compute_statistics, model_statistics, statistics_provider
from evomerge.merge.methods import get_method
from evomerge.merge.statistics import StatisticsFile
from evomerge.recipe import DataItems, Recipe, RecipeError, Statistic


def merge(name, tensors, statistics, params=None, weights=None):
    spec = get_method(name)
    model_params = [{"weight": w} for w in (weights or [1.0] * len(tensors))]
    bound, model_params = spec.bind(params or {}, model_params)
    return spec.fn(tensors, None, model_params, bound, None, statistics)


# --- the methods, against direct computations -----------------------------------------------------


def test_fisher_is_the_fisher_weighted_average() -> None:
    rng = np.random.default_rng(0)
    thetas = [rng.normal(size=(5, 4)) for _ in range(3)]
    fishers = [rng.uniform(0, 2, size=(5, 4)) for _ in range(3)]
    weights, floor = [1.0, 0.5, 2.0], 1e-3
    num = sum(w * (f + floor) * t for w, f, t in zip(weights, fishers, thetas))
    den = sum(w * (f + floor) for w, f in zip(weights, fishers))
    got = merge(
        "fisher",
        [torch.tensor(t, dtype=torch.float64) for t in thetas],
        [torch.tensor(f) for f in fishers],
        {"fisher_floor": floor},
        weights,
    )
    np.testing.assert_allclose(got.numpy(), num / den, rtol=1e-10)
    # a model whose Fisher is far larger on an entry decides that entry
    one_sided = [torch.tensor([1e6, 0.0]), torch.tensor([0.0, 1e6])]
    out = merge("fisher", [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])], one_sided)
    np.testing.assert_allclose(out.numpy(), [1.0, 3.0], atol=1e-8)


def test_regmean_with_alpha_1_is_the_least_squares_merge_of_the_layers() -> None:
    """RegMean's closed form equals the W minimizing sum_i ||X_i W^T - X_i W_i^T||^2, solved here by lstsq."""
    rng = np.random.default_rng(1)
    out_features, in_features = 6, 5
    xs = [rng.normal(size=(n, in_features)) for n in (20, 30)]
    ws = [rng.normal(size=(out_features, in_features)) for _ in xs]
    stacked_x = np.concatenate(xs)
    stacked_y = np.concatenate([x @ w.T for x, w in zip(xs, ws)])
    expected = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0].T
    got = merge(
        "regmean",
        [torch.tensor(w) for w in ws],
        [torch.tensor(x.T @ x) for x in xs],
        {"alpha": 1.0},
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_regmean_shrinks_off_diagonals_by_alpha_and_weighs_models() -> None:
    rng = np.random.default_rng(2)
    ws = [rng.normal(size=(3, 4)) for _ in range(2)]
    grams = [(lambda a: a.T @ a)(rng.normal(size=(10, 4))) for _ in range(2)]
    alpha, weights = 0.6, [2.0, 0.5]
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    expected = sum(w * W @ g for w, W, g in zip(weights, ws, shrunk)) @ np.linalg.inv(
        sum(w * g for w, g in zip(weights, shrunk))
    )
    got = merge("regmean", [torch.tensor(w) for w in ws], [torch.tensor(g) for g in grams], {"alpha": alpha}, weights)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8)
    # alpha = 0: a per-input-feature average weighted by each model's input energy on that feature
    diag = merge("regmean", [torch.tensor(w) for w in ws], [torch.tensor(g) for g in grams], {"alpha": 0.0})
    d = [np.diag(g) for g in grams]
    np.testing.assert_allclose(diag.numpy(), (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1]), rtol=1e-8)


def test_tensors_without_statistics_are_averaged() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    for name in ("fisher", "regmean"):
        np.testing.assert_allclose(merge(name, [a, b], [None, None], weights=[1.0, 3.0]).numpy(), [2.5, 5.0])


# --- the statistics, against the model's own activations and gradients ---------------------------


def _items(vocab: int, rows: int = 4, width: int = 7, seed: int = 0) -> TokenItems:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    lengths = torch.tensor([width, width - 2, width - 1, width - 3])[:rows]
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = 0  # padding
    mask = torch.zeros(rows, width, dtype=torch.bool)
    targets = torch.zeros_like(ids)
    for r, n in enumerate(lengths.tolist()):  # the last two real tokens are the continuation
        mask[r, n - 3 : n - 1] = True
        targets[r, n - 3 : n - 1] = ids[r, n - 2 : n]
    return TokenItems(ids, lengths, mask, targets, torch.arange(rows), torch.zeros(rows, dtype=torch.long), None)


def test_gram_statistics_are_the_layers_input_gram_over_real_tokens(random_family) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_family["a"], dtype=torch.float32).eval()
    items = _items(model.config.vocab_size)
    grams = compute_statistics(model, [items], Statistic.GRAM, batch_tokens=14)  # several chunks
    with torch.no_grad():
        hidden = model.model.embed_tokens(items.ids)
        first = model.model.layers[0].input_layernorm(hidden)  # the input of layer 0's q/k/v projections
    real = torch.arange(items.ids.shape[1])[None, :] < items.lengths[:, None]
    x = first[real].double()
    expected = (x.T @ x / len(x)).float()
    torch.testing.assert_close(grams["model.layers.0.self_attn.q_proj.weight"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grams["model.layers.0.self_attn.v_proj.weight"], expected, rtol=1e-5, atol=1e-6)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(grams) == {f"{n}.weight" for n in linears}


def test_fisher_statistics_are_the_mean_squared_per_item_gradient_at_unit_norm(random_family) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_family["b"], dtype=torch.float32).eval()
    items = _items(model.config.vocab_size, seed=1)
    fisher = compute_statistics(model, [items], Statistic.FISHER)
    params = dict(model.named_parameters())
    squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for r in range(len(items.ids)):  # per item: the mean NLL of its continuation tokens, by hand
        logits = model(items.ids[r : r + 1]).logits[0]
        positions = items.mask[r].nonzero().flatten()
        nll = torch.nn.functional.cross_entropy(logits[positions], items.targets[r, positions])
        for name, grad in zip(params, torch.autograd.grad(nll, list(params.values()), allow_unused=True)):
            if grad is not None:
                squares[name] += grad.double() ** 2
    norm = torch.sqrt(sum((s / len(items.ids)).square().sum() for s in squares.values()))
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(fisher[name], (squares[name] / len(items.ids) / norm).float(), rtol=1e-4, atol=1e-9)
    total = sum(float(f.double().square().sum()) for f in fisher.values())
    assert total == pytest.approx(1.0, rel=1e-5)


# --- recipes with a data: section ------------------------------------------------------------------


def test_recipes_say_what_data_is_missing_or_misplaced() -> None:
    models = [{"model": "a"}, {"model": "b"}]
    with pytest.raises(RecipeError, match="data: merge_method 'regmean' computes statistics from data"):
        Recipe.from_dict({"merge_method": "regmean", "models": models})
    with pytest.raises(RecipeError, match="data: only data-aware methods"):
        Recipe.from_dict({"merge_method": "linear", "models": models, "data": {"items": [{"task": "t"}]}})
    with pytest.raises(RecipeError, match=r"data.items\[0\].models: 'c' is not a model"):
        Recipe.from_dict(
            {"merge_method": "fisher", "models": models, "data": {"items": [{"task": "t", "models": ["c"]}]}}
        )
    with pytest.raises(RecipeError, match="no items for model 'b'"):
        Recipe.from_dict(
            {"merge_method": "fisher", "models": models, "data": {"items": [{"task": "t", "models": ["a"]}]}}
        )
    with pytest.raises(RecipeError, match=r"alpha.*out of range"):
        Recipe.from_dict(
            {
                "merge_method": "regmean",
                "models": models,
                "parameters": {"alpha": 1.5},
                "data": {"items": [{"task": "t"}]},
            }
        )


def zoo_recipe(zoo_dir: Path, method: str, **params) -> dict:
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    models = {s: str(zoo_dir / m) for s, m in meta["models"].items()}
    items = [{"task": meta["tasks"][s], "limit": 8, "models": [models[s]]} for s in models]
    recipe = {
        "merge_method": method,
        "models": [{"model": m} for m in models.values()],
        "data": {"include_path": str(zoo_dir / meta["include_path"]), "items": items},
    }
    return recipe | ({"parameters": params} if params else {})


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_evomerge_merge_computes_statistics_once_and_equals_the_in_memory_merge(
    zoo_dir, tmp_path, monkeypatch, method
) -> None:
    import yaml
    from safetensors.torch import load_file

    from evomerge.cli import app
    from evomerge.eval import statistics
    from evomerge.eval.evaluator import CandidateEvaluator
    from evomerge.eval.tasks import Objective

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    recipe = zoo_recipe(zoo_dir, method, **({"alpha": 0.8} if method == "regmean" else {}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    cached = sorted((tmp_path / "cache" / "statistics").glob(f"{'gram' if method == 'regmean' else 'fisher'}-*"))
    assert len(cached) == 3  # one per model, each on its own skill's items
    merged = load_file(tmp_path / "out" / "model.safetensors")

    # a second merge reads the cache: computing again would raise
    def refuse(*args, **kwargs):
        raise AssertionError("statistics computed again")

    monkeypatch.setattr(statistics, "compute_statistics", refuse)
    again = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "again"), "-q"])
    assert again.exit_code == 0, again.output
    assert all(torch.equal(t, load_file(tmp_path / "again" / "model.safetensors")[n]) for n, t in merged.items())

    # the in-memory evaluator (what a search worker runs) merges the same model
    evaluator = CandidateEvaluator(
        [Objective(task="zoo_latin", metric="acc", limit=4)], include_paths=[str(zoo_dir / "tasks")]
    )
    plan = evaluator._plan(Recipe.from_dict(recipe))
    model = evaluator._take_model(plan)
    from evomerge.merge.engine import materialize_into

    materialize_into(model, plan)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=0)
    # and it is not the plain average: the statistics change the linear layers
    from evomerge.merge.engine import plan_recipe

    plain = {
        **recipe,
        "merge_method": "linear",
        "models": [{"model": m["model"], "parameters": {"weight": 1.0}} for m in recipe["models"]],
    }
    plain.pop("data")
    plain.pop("parameters", None)
    average = plan_recipe(Recipe.from_dict(plain))
    from evomerge.merge.engine import compute_tensor

    job = next(j for j in average.jobs if j.name == "model.layers.1.mlp.up_proj.weight")
    assert not torch.allclose(compute_tensor(average, job), merged[job.name], atol=1e-4)


def test_a_merge_without_statistics_is_refused_with_the_reason(zoo_dir) -> None:
    from evomerge.merge.engine import plan_recipe
    from evomerge.merge.plan import PlanError

    with pytest.raises(PlanError, match="no gram statistics for model"):
        plan_recipe(Recipe.from_dict(zoo_recipe(zoo_dir, "regmean")))


def test_statistics_are_keyed_by_the_items(zoo_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    model = zoo_dir / "models" / "greek"
    tasks = [str(zoo_dir / "tasks")]
    four = model_statistics(model, Statistic.GRAM, [DataItems(task="zoo_greek", limit=4)], tasks)
    six = model_statistics(model, Statistic.GRAM, [DataItems(task="zoo_greek", limit=6)], tasks)
    assert four != six and four.is_file() and six.is_file()
    assert StatisticsFile(four).metadata["statistic"] == "gram"
    assert model_statistics(model, Statistic.GRAM, [DataItems(task="zoo_greek", limit=4)], tasks) == four
    assert not list(tmp_path.rglob("*.partial"))  # written to a temporary file, then renamed
    provide = statistics_provider(base_dir=tmp_path)
    recipe = Recipe.from_dict(zoo_recipe(zoo_dir, "fisher"))
    assert set(provide(recipe)) == set(recipe.referenced_models())


# --- a search over a data-aware method ----------------------------------------------------------------


def test_a_search_over_regmean_parameters_uses_the_objectives_items_by_default(zoo_dir, tmp_path, monkeypatch) -> None:
    from evomerge.runtime import make_executor
    from evomerge.search.config import ConfigError, resolve_run_config
    from evomerge.search.driver import Search
    from evomerge.search.report import RunReport
    from evomerge.search.rundir import RunDir

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    config = {
        "name": "regmean",
        "zoo": str(zoo_dir),
        "search_space": {
            "kind": "ps",
            "models": ["latin", "greek"],
            "method": "regmean",
            "parameters": {"alpha": {"low": 0.3, "high": 1.0}, "weight": {"low": 0.2, "high": 1.0}},
        },
        "objectives": [
            {"task": "zoo_latin", "metric": "acc", "split": "search", "limit": 6},
            {"task": "zoo_greek", "metric": "acc", "split": "search", "limit": 6},
        ],
        "optimizer": {"name": "cma", "population": 4, "budget": 4, "seed": 0},
        "runtime": {"workers": 0},
    }
    run = resolve_run_config(config, base_dir=tmp_path)
    assert run.space.data is not None
    assert [(i.task, i.split, i.limit) for i in run.space.data.items] == [
        ("zoo_latin", "search", 6),
        ("zoo_greek", "search", 6),
    ]
    executor = make_executor(run)
    try:
        summary = Search(run, RunDir(tmp_path / "run"), executor).execute()
    finally:
        executor.shutdown()
    assert summary.stopped == "budget"
    records = list(RunDir(tmp_path / "run").records())
    assert len(records) == 4 and all(r.ok for r in records), [r.reason for r in records]
    assert len({r.recipe_hash for r in records}) == 4
    assert len(list((tmp_path / "cache" / "statistics").glob("gram-*"))) == 2  # once per model, shared
    report = RunReport.load(tmp_path / "run")
    assert report is not None
    linear = {**config["search_space"], "method": "linear", "parameters": {"weight": {"low": 0.2, "high": 1.0}}}
    with pytest.raises(ConfigError, match="data: only data-aware methods"):
        resolve_run_config(
            {**config, "search_space": {**linear, "data": {"items": [{"task": "t"}]}}}, base_dir=tmp_path
        )
    # exported: a recipe evomerge runs (its header says mergekit cannot), and a materialized checkpoint
    from evomerge.cli import app

    exported = CliRunner().invoke(
        app,
        ["export", str(tmp_path / "run"), "-o", str(tmp_path / "pick.yaml"), "--checkpoint", str(tmp_path / "ck")],
    )
    assert exported.exit_code == 0, exported.output
    assert "mergekit has no equivalent" in " ".join(exported.output.split())
    text = (tmp_path / "pick.yaml").read_text()
    assert text.startswith("# merge_method regmean is evomerge's own") and "data:" in text
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    merged_again = CliRunner().invoke(app, ["merge", str(tmp_path / "pick.yaml"), str(tmp_path / "again"), "-q"])
    assert merged_again.exit_code == 0, merged_again.output
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "ck" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(one[name], two[name]) for name in one)

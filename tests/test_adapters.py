"""PEFT LoRA adapters: as sources (BASE+ADAPTER equals PEFT's merge_and_unload), merged in adapter space
(every add_weighted_adapter combination equals PEFT's own), written as adapters PEFT loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_random_llama
from typer.testing import CliRunner

from evomerge.merge.adapters import AdapterCheckpoint, LoraAdapter, merge_adapters, module_order
from evomerge.merge.io import CheckpointError
from evomerge.recipe.adapters import COMBINATIONS, SAME_RANK, AdapterMerge


def make_adapter(base: Path, out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj"), **kw) -> Path:
    """A PEFT LoRA adapter of ``base`` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **kw)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_random_llama(root / "base", 0)
    return {
        "base": base,
        "a": make_adapter(base, root / "a", 1),
        "b": make_adapter(base, root / "b", 2),
        "c": make_adapter(base, root / "c", 3, r=6, targets=("q_proj", "o_proj", "up_proj", "embed_tokens")),
        "rs": make_adapter(base, root / "rs", 4, use_rslora=True),
    }


def peft_model(base: Path, adapters: list[Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="n0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"n{i}")
    return model


@pytest.mark.parametrize("adapter", ["a", "c", "rs"])
def test_base_plus_adapter_is_peft_merge_and_unload(family, adapter) -> None:
    merged = peft_model(family["base"], [family[adapter]]).merge_and_unload().state_dict()
    checkpoint = AdapterCheckpoint(family["base"], family[adapter])
    assert set(checkpoint.tensors) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(checkpoint.get(name), tensor, rtol=0, atol=1e-6)
    adapted = {f"{module}.weight" for module in LoraAdapter(family[adapter]).modules}
    assert {n for n in merged if not checkpoint.stored(n)} == adapted  # the rest is copied byte for byte


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_adapter_merges_equal_peft_add_weighted_adapter(family, combination, monkeypatch) -> None:
    names = ["a", "b"] if combination in SAME_RANK else ["a", "b", "c"]
    weights = [0.7, -0.4, 1.2][: len(names)]
    spec = AdapterMerge.from_dict(
        {
            "adapter_merge": combination,
            "base_model": str(family["base"]),
            "adapters": [{"adapter": str(family[n]), "weight": w} for n, w in zip(names, weights)],
            "density": 0.6,
        }
    )
    ours, rank = merge_adapters(spec, [LoraAdapter(family[n]) for n in names], module_order(family["base"]), seed=5)
    model = peft_model(family["base"], [family[n] for n in names])
    # PEFT draws dare's masks from torch's global generator (after initializing the new adapter); give its
    # torch.bernoulli a generator seeded like ours, so that what is compared is everything but the RNG
    generator, bernoulli = torch.Generator().manual_seed(5), torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda t, **kw: bernoulli(t, generator=generator))
    model.add_weighted_adapter(
        [f"n{i}" for i in range(len(names))], weights, "m", combination_type=combination, density=0.6
    )
    monkeypatch.undo()
    assert model.peft_config["m"].r == rank
    state = model.state_dict()
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in state if ".m." in k or k.endswith(".m")}
    assert set(ours) == adapted
    for module, lora in ours.items():
        if lora.embedding:
            a, b = (
                state[f"base_model.model.{module}.lora_embedding_A.m"],
                state[f"base_model.model.{module}.lora_embedding_B.m"],
            )
        else:
            a, b = (
                state[f"base_model.model.{module}.lora_A.m.weight"],
                state[f"base_model.model.{module}.lora_B.m.weight"],
            )
        torch.testing.assert_close(lora.A, a, rtol=0, atol=0)
        torch.testing.assert_close(lora.B, b, rtol=0, atol=0)


def test_evomerge_merge_writes_an_adapter_peft_loads(family, tmp_path, monkeypatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evomerge.cli import app

    spec = {
        "adapter_merge": "svd",
        "base_model": str(family["base"]),
        "adapters": [{"adapter": str(family["a"]), "weight": 1.0}, {"adapter": str(family["c"]), "weight": 0.5}],
        "svd_rank": 5,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 5
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family["base"]), tmp_path / "out")
    reference = peft_model(family["base"], [family["a"], family["c"]])
    reference.add_weighted_adapter(["n0", "n1"], [1.0, 0.5], "m", combination_type="svd", svd_rank=5)
    reference.set_adapter("m")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    # and the merged adapter is a model source like any other: BASE+ADAPTER
    merged = AdapterCheckpoint(family["base"], tmp_path / "out")
    for name, tensor in loaded.merge_and_unload().state_dict().items():
        torch.testing.assert_close(merged.get(name), tensor, rtol=0, atol=1e-6)
    # an existing output is not replaced without --overwrite
    again = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert again.exit_code == 2 and "overwrite" in again.output


def test_cat_of_adapters_is_task_arithmetic_of_their_models(family, tmp_path) -> None:
    """Concatenating the factors keeps every delta exactly: the adapter-space merge equals the full-weight
    task arithmetic (λ 1) of the BASE+ADAPTER sources, which evomerge's ordinary engine computes."""
    from evomerge.merge.adapters import merge_adapters_to_disk
    from evomerge.merge.engine import compute_tensor, plan_recipe
    from evomerge.recipe import Recipe

    spec = AdapterMerge.from_dict(
        {
            "adapter_merge": "cat",
            "base_model": str(family["base"]),
            "adapters": [{"adapter": str(family[n]), "weight": w} for n, w in (("a", 0.8), ("c", 0.3))],
        }
    )
    merge_adapters_to_disk(spec, tmp_path / "cat")
    base = str(family["base"])
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": f"{base}+{family['a']}", "parameters": {"weight": 0.8}},
                {"model": f"{base}+{family['c']}", "parameters": {"weight": 0.3}},
            ],
        }
    )
    plan = plan_recipe(recipe)
    cat = AdapterCheckpoint(family["base"], tmp_path / "cat")
    for job in plan.jobs:
        torch.testing.assert_close(compute_tensor(plan, job), cat.get(job.name), rtol=1e-5, atol=1e-6)


def test_a_recipe_over_adapters_merges_to_disk(family, tmp_path) -> None:
    from safetensors.torch import load_file

    from evomerge.cli import app

    base = str(family["base"])
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": f"{base}+{family[n]}", "parameters": {"weight": 1.0, "density": 0.5}} for n in "ab"],
        "dtype": "float32",
    }
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    base_tensors = load_file(family["base"] / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(out[q], base_tensors[q])  # adapted weights merged, not copied from the base
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(out[k], base_tensors[k])  # no adapter touches k_proj: the base's (TIES of zeros)


def test_adapters_that_cannot_be_read_are_refused_with_the_reason(family, tmp_path) -> None:
    from evomerge.merge.plan import PlanError, open_checkpoints
    from evomerge.recipe import Recipe, RecipeError

    dora = make_adapter(family["base"], tmp_path / "dora", 7, use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        LoraAdapter(dora)
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        LoraAdapter(family["base"])
    other = make_random_llama(tmp_path / "wide", 1, hidden=48)
    with pytest.raises(CheckpointError, match="an adapter of another model"):
        AdapterCheckpoint(other, family["a"])
    base = str(family["base"])
    missing = Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path}/nope", "parameters": {"weight": 1}}]}
    )
    with pytest.raises(PlanError, match="BASE\\+ADAPTER"):
        open_checkpoints(missing)
    with pytest.raises(RecipeError, match="density"):
        AdapterMerge.from_dict(
            {"adapter_merge": "ties", "base_model": base, "adapters": [{"adapter": "x"}, {"adapter": "y"}]}
        )
    spec = AdapterMerge.from_dict(
        {
            "adapter_merge": "linear",
            "base_model": base,
            "adapters": [{"adapter": str(family["a"])}, {"adapter": str(family["c"])}],
        }
    )
    with pytest.raises(ValueError, match="same rank"):
        merge_adapters(spec, [LoraAdapter(family["a"]), LoraAdapter(family["c"])], module_order(family["base"]))


def test_base_plus_adapter_recipes_equal_mergekit(family, tmp_path) -> None:
    """mergekit reads BASE+ADAPTER too (it merges the adapter with PEFT first): same tensors."""
    from test_mergekit_parity import assert_same_model, run_mergekit

    from evomerge.merge.engine import merge_to_disk
    from evomerge.recipe import Recipe

    base = str(family["base"])
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": f"{base}+{family['a']}", "parameters": {"weight": 0.8}},
            {"model": f"{base}+{family['rs']}", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    ours = merge_to_disk(Recipe.from_dict(recipe), tmp_path / "ours")
    theirs = run_mergekit(recipe, tmp_path / "mergekit", lora_merge_cache=str(tmp_path / "lora-cache"))
    assert_same_model(ours, theirs, atol=1e-6)


def test_a_search_over_the_zoo_lora_specialists(zoo_dir, tmp_path) -> None:
    """The zoo names its LoRA specialists lora-<skill> (BASE+ADAPTER); a search merges them like models."""
    from evomerge.runtime import make_executor
    from evomerge.search.config import resolve_run_config
    from evomerge.search.driver import Search
    from evomerge.search.rundir import RunDir

    config = {
        "name": "lora",
        "zoo": str(zoo_dir),
        "search_space": {
            "kind": "ps",
            "models": ["lora-latin", "base+adapters/greek"],
            "base_model": "base",
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 2.0}},
        },
        "objectives": [
            {"task": "zoo_latin", "metric": "acc", "limit": 6},
            {"task": "zoo_greek", "metric": "acc", "limit": 6},
        ],
        "optimizer": {"name": "cma", "population": 4, "budget": 4, "seed": 0},
        "runtime": {"workers": 0},
    }
    with pytest.raises(Exception, match="neither a zoo name nor an existing directory"):
        resolve_run_config(config, base_dir=tmp_path)  # adapters/greek is relative to the config, not the zoo
    config["search_space"]["models"][1] = f"base+{zoo_dir / 'adapters' / 'greek'}"
    run = resolve_run_config(config, base_dir=tmp_path)
    base = str(zoo_dir / "models" / "base")
    assert run.space.models == [f"{base}+{zoo_dir / 'adapters' / 'latin'}", f"{base}+{zoo_dir / 'adapters' / 'greek'}"]
    executor = make_executor(run)
    try:
        Search(run, RunDir(tmp_path / "run"), executor).execute()
    finally:
        executor.shutdown()
    records = list(RunDir(tmp_path / "run").records())
    assert len(records) == 4 and all(r.ok for r in records), [r.reason for r in records]
    assert max(r.objectives["zoo_latin/acc"] for r in records) > 0.5  # the LoRA skill survives the merge


def test_eval_scores_an_adapter_merge_file_as_its_merged_adapter(zoo_dir, tmp_path) -> None:
    """``evomerge eval`` takes an ``adapter_merge:`` file: the same scores as merging it with
    ``evomerge merge`` and scoring BASE+ADAPTER."""
    import json

    import yaml
    from typer.testing import CliRunner

    from evomerge.cli import app
    from evomerge.eval.evaluator import CandidateEvaluator
    from evomerge.eval.tasks import Objective
    from evomerge.merge.adapters import merge_adapters_to_disk
    from evomerge.recipe import Recipe

    base = str(zoo_dir / "models" / "base")
    spec = {
        "adapter_merge": "cat",
        "base_model": base,
        "adapters": [
            {"adapter": str(zoo_dir / "adapters" / "latin"), "weight": 0.8},
            {"adapter": str(zoo_dir / "adapters" / "greek"), "weight": 0.6},
        ],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = ["eval", str(path), "--tasks", "zoo_latin,zoo_greek", "--include-path", str(zoo_dir / "tasks")]
    result = CliRunner().invoke(app, [*args, "--limit", "20", "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["objectives"]
    adapter = merge_adapters_to_disk(AdapterMerge.from_dict(spec), tmp_path / "adapter")
    evaluator = CandidateEvaluator(
        [Objective(task=t, split="test", limit=20) for t in ("zoo_latin", "zoo_greek")],
        include_paths=[zoo_dir / "tasks"],
    )
    expected = evaluator.evaluate(
        Recipe.from_dict(
            {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
        )
    )
    assert scored == expected.objectives and 0 < min(scored.values())

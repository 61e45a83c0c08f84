"""Merge engine: streaming output, atomic writes, clear errors before writing, in-place materialization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_random_llama
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge import methods
from evomerge.merge.engine import materialize_into, merge_to_disk, plan_recipe
from evomerge.merge.io import CheckpointError, OutputTensor, ShardedWriter, parse_size, read_safetensors_header
from evomerge.merge.plan import PlanError
from evomerge.recipe import Recipe


def load_all(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def linear_recipe(family, **extra) -> Recipe:
    return Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(family["a"]), "parameters": {"weight": 0.25}},
                {"model": str(family["b"]), "parameters": {"weight": 0.75}},
            ],
            "dtype": "float32",
            **extra,
        }
    )


def test_linear_merge_writes_a_loadable_checkpoint(random_family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    out = merge_to_disk(linear_recipe(random_family), tmp_path / "out")
    merged = load_all(out)
    a, b = load_all(random_family["a"]), load_all(random_family["b"])
    assert merged.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name], rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    assert (out / "evomerge_recipe.yaml").exists()
    assert Recipe.load(out / "evomerge_recipe.yaml") == linear_recipe(random_family)


def test_sharded_output_equals_single_file(random_family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    single = merge_to_disk(linear_recipe(random_family), tmp_path / "single")
    sharded = merge_to_disk(linear_recipe(random_family), tmp_path / "sharded", out_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    a, b = load_all(single), load_all(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(sharded)  # transformers follows the index


def test_output_dtype_and_layer_slices(random_family, tmp_path) -> None:
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(random_family["a"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(random_family["b"]), "layer_range": [1, 3]}]},
            ],
            "out_dtype": "bfloat16",
        }
    )
    out = merge_to_disk(recipe, tmp_path / "stack")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["dtype"] == "bfloat16"
    merged, b = load_all(out), load_all(random_family["b"])
    assert merged["model.layers.3.mlp.up_proj.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(
        merged["model.layers.3.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"].bfloat16()
    )
    torch.testing.assert_close(merged["lm_head.weight"], b["lm_head.weight"].bfloat16())


def test_in_memory_materialization_equals_disk(random_family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = linear_recipe(random_family)
    disk = load_all(merge_to_disk(recipe, tmp_path / "disk"))
    model = AutoModelForCausalLM.from_pretrained(random_family["base"], dtype=torch.float32)
    plan = plan_recipe(recipe)
    materialize_into(model, plan)
    state = model.state_dict()
    for name, tensor in disk.items():
        assert torch.equal(state[name], tensor), name


def test_failed_merge_leaves_nothing(random_family, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    original = methods.METHODS["linear"]

    def explode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full (simulated)")
        return original.fn(*args, **kwargs)

    monkeypatch.setitem(methods.METHODS, "linear", methods.MethodSpec(**{**original.__dict__, "fn": explode}))
    with pytest.raises(RuntimeError, match="simulated"):
        merge_to_disk(linear_recipe(random_family), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(random_family, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_to_disk(linear_recipe(random_family), out)
    assert (out / "keep.txt").read_text() == "precious"
    merge_to_disk(linear_recipe(random_family), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


# --- errors found before anything is written ---------------------------------------------------


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, random_family) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    wide = make_random_llama(root / "wide", 7, hidden=48)
    big_vocab = make_random_llama(root / "big_vocab", 8, vocab=80)
    deep = make_random_llama(root / "deep", 9, layers=4)
    other_arch = root / "other_arch"
    shutil.copytree(random_family["a"], other_arch)
    config = json.loads((other_arch / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (other_arch / "config.json").write_text(json.dumps(config))
    renamed = root / "renamed"
    renamed.mkdir()
    shutil.copy(random_family["a"] / "config.json", renamed)
    tensors = load_all(random_family["a"])
    tensors["model.layers.0.mlp.gate.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")
    from safetensors.torch import save_file

    save_file(tensors, str(renamed / "model.safetensors"))
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(random_family["a"] / "config.json", pickled)
    torch.save(load_all(random_family["a"]), pickled / "pytorch_model.bin")
    not_ckpt = root / "not_ckpt"
    not_ckpt.mkdir()
    (not_ckpt / "config.json").write_text("{}")
    (not_ckpt / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return {
        "wide": wide,
        "big_vocab": big_vocab,
        "deep": deep,
        "other_arch": other_arch,
        "renamed": renamed,
        "pickled": pickled,
        "not_ckpt": not_ckpt,
    }


@pytest.mark.parametrize(
    "other, error, message",
    [
        ("wide", PlanError, "shapes disagree"),
        ("big_vocab", PlanError, "vocab sizes disagree"),
        ("deep", PlanError, "layer counts disagree"),
        ("other_arch", PlanError, "architectures disagree"),
        ("renamed", PlanError, "tensor names disagree"),
        ("pickled", CheckpointError, "--allow-pickle"),
        ("not_ckpt", CheckpointError, "not a safetensors file"),
    ],
)
def test_incompatible_models_fail_before_writing(random_family, odd_models, tmp_path, other, error, message) -> None:
    recipe = Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(random_family["a"]), "parameters": {"weight": 0.5}},
                {"model": str(odd_models[other]), "parameters": {"weight": 0.5}},
            ],
        }
    )
    with pytest.raises(error, match=message):
        merge_to_disk(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_pickle_checkpoints_load_when_allowed(random_family, odd_models, tmp_path) -> None:
    recipe = Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": str(odd_models["pickled"]), "parameters": {"weight": 1.0}}]}
    )
    out = merge_to_disk(recipe, tmp_path / "out", allow_pickle=True)
    a, merged = load_all(random_family["a"]), load_all(out)
    assert all(torch.equal(a[k], merged[k]) for k in a)


def test_layer_range_out_of_bounds_and_missing_model(random_family, tmp_path) -> None:
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(random_family["a"]), "layer_range": [2, 5]}]}],
        }
    )
    with pytest.raises(PlanError, match=r"slices\[0\].sources\[0\].layer_range: \[2, 5\] is out of bounds .* 3 layers"):
        merge_to_disk(recipe, tmp_path / "out")
    missing = Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]}
    )
    with pytest.raises(PlanError, match="does not exist"):
        merge_to_disk(missing, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_required_parameter_is_named(random_family, tmp_path) -> None:
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [{"model": str(random_family["a"])}]})
    with pytest.raises(PlanError, match="parameters.weight: required"):
        merge_to_disk(recipe, tmp_path / "out")


# --- io ---------------------------------------------------------------------------------------


def test_streaming_writer_round_trips_every_dtype(tmp_path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2).to(torch.float16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.empty(0, 4),
    }
    layout = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, layout, parse_size("40B"))
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    loaded = load_all(tmp_path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    for file in tmp_path.glob("*.safetensors"):
        for name, info in read_safetensors_header(file).items():
            assert info.shape == tuple(tensors[name].shape) and info.dtype == tensors[name].dtype


def test_writer_refuses_out_of_order_tensors(tmp_path) -> None:
    writer = ShardedWriter(tmp_path, [OutputTensor("a", (2,), torch.float32)], 10**9)
    with pytest.raises(RuntimeError, match="does not match the planned"):
        writer.write("b", torch.zeros(2))


@pytest.mark.parametrize(
    "text, value", [("5GB", 5 * 10**9), ("500M", 500 * 10**6), ("1.5gb", 1_500_000_000), ("2GiB", 2 * 2**30)]
)
def test_parse_size(text, value) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="expected a"):
        parse_size("lots")


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_merge_and_its_errors(random_family, tmp_path) -> None:
    runner = CliRunner()
    recipe_path = tmp_path / "r.yaml"
    linear_recipe(random_family).save(recipe_path)
    result = runner.invoke(app, ["merge", str(recipe_path), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 1, densty: 2}\n")
    result = runner.invoke(app, ["merge", str(bad), str(tmp_path / "out2")])
    assert result.exit_code == 2
    assert "densty" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out2").exists()

    result = runner.invoke(app, ["merge", str(recipe_path), str(tmp_path / "out3"), "--device", "tpu"])
    assert result.exit_code == 2 and "--device" in result.output

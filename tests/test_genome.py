"""Search spaces and genomes: bounds, granularity, categorical genes, DFS path repair, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.genome import make_genome
from evomerge.search.space import SpaceError, load_space

# --- genome --------------------------------------------------------------------------------------


def ps_space(**overrides) -> dict:
    space = {
        "models": ["/m/a", "/m/b"],
        "base_model": "/m/base",
        "method": "ties",
        "parameters": {"weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.2, "high": 1.0}},
    }
    space.update(overrides)
    return space


def layer_values(recipe, model_index: int, key: str, layers: int, name: str = "mlp") -> list[float]:
    from evomerge.recipe import evaluate_setting

    setting = recipe.models[model_index].parameters[key]
    return [
        evaluate_setting(setting, f"model.layers.{i}.{name}.x.weight", i / (layers - 1) if layers > 1 else 1.0)
        for i in range(layers)
    ]


def test_bounds_map_to_the_ends_of_the_range() -> None:
    genome = make_genome(load_space(ps_space()), num_layers=4)
    low, high = genome.decode(np.zeros(genome.dim)), genome.decode(np.ones(genome.dim))
    assert low.models[0].parameters == {"weight": 0.0, "density": 0.2}
    assert high.models[1].parameters == {"weight": 2.0, "density": 1.0}
    # out-of-range genes are clipped, never an invalid recipe
    assert genome.decode(np.full(genome.dim, 7.0)) == high


def test_granularity_that_does_not_divide_the_layer_count() -> None:
    genome = make_genome(load_space(ps_space(granularity=2)), num_layers=5)
    assert [len(g) for g in genome.groups] == [2, 2, 1]
    x = np.zeros(genome.dim)
    for g in range(3):
        x[genome._slots[("weight", "/m/a", g, "all")]] = [0.1, 0.5, 0.9][g]
    values = layer_values(genome.decode(x), 0, "weight", 5)
    assert values == pytest.approx([0.2, 0.2, 1.0, 1.0, 1.8])


def test_per_layer_and_attention_mlp_split() -> None:
    genome = make_genome(load_space(ps_space(granularity="layer", split_attn_mlp=True)), num_layers=3)
    assert genome.dim == 2 * 2 * 3 * 2
    x = np.random.default_rng(0).random(genome.dim)
    recipe = genome.decode(x)
    attn = layer_values(recipe, 1, "density", 3, "self_attn")
    mlp = layer_values(recipe, 1, "density", 3, "mlp")
    for layer in range(3):
        assert attn[layer] == pytest.approx(0.2 + 0.8 * x[genome._slots[("density", "/m/b", layer, "attn")]], abs=1e-6)
        assert mlp[layer] == pytest.approx(0.2 + 0.8 * x[genome._slots[("density", "/m/b", layer, "rest")]], abs=1e-6)
    again = genome.decode(genome.encode(recipe))
    assert again == recipe


def test_per_layer_and_per_module_split() -> None:
    from evomerge.search.genome import MODULE_PARTS
    from evomerge.search.space import SpaceError

    genome = make_genome(load_space(ps_space(granularity="layer", split_modules=True)), num_layers=2)
    assert genome.dim == 2 * 2 * 2 * (len(MODULE_PARTS) + 1)
    assert genome.names[1].endswith("[k_proj]")
    x = np.random.default_rng(1).random(genome.dim)
    recipe = genome.decode(x)
    for layer in range(2):
        for part in (*MODULE_PARTS, "rest"):
            # a tensor name the part's filter matches (the rest: a norm, matched by no projection filter)
            name = "input_layernorm" if part == "rest" else f"self_attn.{part}"
            [value] = layer_values(recipe, 0, "density", 2, name)[layer : layer + 1]
            slot = genome._slots[("density", "/m/a", layer, part)]
            assert value == pytest.approx(0.2 + 0.8 * x[slot], abs=1e-6), (layer, part)
    assert genome.decode(genome.encode(recipe)) == recipe
    with pytest.raises(SpaceError, match="split_modules: give it or split_attn_mlp, not both"):
        load_space(ps_space(split_modules=True, split_attn_mlp=True))


def test_method_and_normalize_genes() -> None:
    genome = make_genome(
        load_space(ps_space(method=["ties", "task_arithmetic", "dare_linear"], normalize="search")), num_layers=2
    )
    assert genome.names[:2] == ["method", "normalize"]
    picks = {
        genome.decode(np.r_[m, n, np.full(genome.dim - 2, 0.5)]).merge_method for m in (0.0, 0.5, 1.0) for n in (0, 1)
    }
    assert picks == {"ties", "task_arithmetic", "dare_linear"}
    recipe = genome.decode(np.r_[0.0, 0.9, np.full(genome.dim - 2, 0.5)])
    assert recipe.parameters["normalize"] is True


@pytest.mark.parametrize(
    "space, message",
    [
        (ps_space(parameters={"density": {"low": 0.2, "high": 1.0}}), "parameters.weight: method 'ties' needs it"),
        (ps_space(parameters={"weight": {"low": 1.0, "high": 0.0}}), "low <= high"),
        (ps_space(parameters={"weight": 1.0, "t": {"low": 0, "high": 1}}), "parameters.t: not a parameter"),
        (ps_space(base_model=None), "base_model: method 'ties' needs a base model"),
        (ps_space(granularity=0), "block size must be >= 1"),
        ({"kind": "dfs", "models": ["/m/a"], "scale": {"low": 0.0, "high": 2.0}}, "scales must be > 0"),
        ({"kind": "xyz", "models": ["/m/a"]}, "kind: 'xyz' is not valid"),
    ],
)
def test_invalid_spaces_name_the_field(space, message) -> None:
    with pytest.raises(SpaceError, match=message):
        load_space(space)


def test_dfs_paths_are_repaired_not_rejected() -> None:
    space = load_space(
        {"kind": "dfs", "models": ["/m/a", "/m/b"], "repeats": 2, "max_path_length": 5, "min_path_length": 2}
    )
    genome = make_genome(space, num_layers=3)
    n = len(genome.slots)
    assert n == 2 * 2 * 3 and genome.dim == 2 * n
    # nothing selected: the strongest two slots are used
    x = np.zeros(genome.dim)
    x[4], x[9] = 0.4, 0.3
    path = genome.decode_path(x)
    assert len(path) == 2 and {(h.model, h.layer) for h in path} == {genome.slots[4], genome.slots[9]}
    # everything selected: the five strongest, in slot order
    x = np.ones(genome.dim)
    x[:n] = np.linspace(0.6, 1.0, n)
    path = genome.decode_path(x)
    assert [(h.model, h.layer) for h in path] == genome.slots[n - 5 :]
    # scales are log-uniform between the bounds
    x[n:] = 0.5
    assert [h.scale for h in genome.decode_path(x)] == pytest.approx([1.0] * 5)
    recipe = genome.decode(x)
    assert recipe.merge_method == "passthrough" and len(recipe.slices) == 5
    assert genome.decode_path(genome.encode(recipe)) == genome.decode_path(x)


def test_global_parameters_get_one_gene_not_one_per_model() -> None:
    """slerp's ``t`` is one value for the merge: a copy per model would be inert genes."""
    space = load_space(
        {
            "models": ["/m/a", "/m/b"],
            "base_model": "/m/a",
            "method": "slerp",
            "parameters": {"t": {"low": 0.0, "high": 1.0}},
            "granularity": "layer",
        }
    )
    genome = make_genome(space, num_layers=3)
    assert genome.names == ["t[g0]", "t[g1]", "t[g2]"]
    x = np.array([0.1, 0.5, 0.9])
    recipe = genome.decode(x)
    assert recipe.parameters["t"] == pytest.approx([0.1, 0.5, 0.9])
    # every gene changes the recipe: none is inert
    for i in range(genome.dim):
        moved = x.copy()
        moved[i] = 0.3
        assert genome.decode(moved) != recipe
    assert genome.encode(recipe) == pytest.approx(x)


def test_per_model_and_global_parameters_side_by_side() -> None:
    space = load_space(
        {
            "models": ["/m/a", "/m/b"],
            "base_model": "/m/base",
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.5, "high": 1.5}},
        }
    )
    genome = make_genome(space, num_layers=2)
    assert genome.names == ["weight[a][g0]", "weight[b][g0]", "lambda[g0]"]
    recipe = genome.decode(np.array([0.2, 0.4, 1.0]))
    assert [m.parameters["weight"] for m in recipe.models] == pytest.approx([0.2, 0.4])
    assert recipe.parameters["lambda"] == pytest.approx(1.5)

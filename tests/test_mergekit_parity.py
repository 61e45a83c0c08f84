"""evomerge merge == mergekit's run_merge on the same recipe, tensor by tensor.

mergekit is the reference implementation. Deterministic methods must agree to 1e-5 (float32) on
every output tensor; randomized ones (dare, della) are checked for seed determinism and for the
statistics mergekit's semantics imply (kept fraction ≈ density, survivors rescaled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_engine import load_all

from evomerge.merge.engine import merge_to_disk
from evomerge.recipe import Recipe

GRADIENT_WEIGHT = [
    {"filter": "self_attn", "value": [0.2, 0.9]},
    {"filter": "mlp", "value": [0.7, 0.1, 0.5]},
    {"value": 0.4},
]


def models_recipe(
    method: str, family: dict[str, Path], names: list[str], per_model: list[dict], base: bool = True, **top: Any
) -> dict:
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(family[n]), **({"parameters": p} if p else {})} for n, p in zip(names, per_model)],
        "dtype": "float32",
    }
    if base:
        recipe["base_model"] = str(family["base"])
    if top:
        recipe["parameters"] = top
    return recipe


def deterministic_recipes(f: dict[str, Path]) -> dict[str, dict]:
    three = ["a", "b", "c"]
    return {
        "linear": models_recipe(
            "linear", f, three, [{"weight": GRADIENT_WEIGHT}, {"weight": 0.3}, {"weight": [0.1, 1.0]}], base=False
        ),
        "linear_unnormalized": models_recipe(
            "linear", f, ["a", "b"], [{"weight": 1.2}, {"weight": [-0.4, 0.6]}], base=False, normalize=False
        ),
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(f["base"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(f["base"]), "layer_range": [0, 3]},
                        {"model": str(f["a"]), "layer_range": [0, 3]},
                    ]
                }
            ],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "task_arithmetic": models_recipe(
            "task_arithmetic",
            f,
            three,
            [{"weight": GRADIENT_WEIGHT}, {"weight": 0.5}, {"weight": [1.0, 0.2]}],
            **{"lambda": 0.9},
        ),
        "ties": models_recipe(
            "ties",
            f,
            three,
            [
                {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]},
                {"weight": [0.2, 0.9], "density": 0.5},
                {"weight": 0.5, "density": [0.9, 0.2]},
            ],
            int8_mask=True,
        ),
        "ties_unnormalized": models_recipe(
            "ties", f, ["a", "b"], [{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.6}], normalize=False
        ),
        "breadcrumbs": models_recipe(
            "breadcrumbs",
            f,
            three,
            [
                {"weight": 0.5, "density": 0.8, "gamma": 0.05},
                {"weight": 0.3, "density": 0.6, "gamma": 0.1},
                {"weight": 0.7, "density": 0.9, "gamma": 0.01},
            ],
        ),
        "breadcrumbs_ties": models_recipe(
            "breadcrumbs_ties",
            f,
            three,
            [
                {"weight": 0.5, "density": 0.8, "gamma": 0.05},
                {"weight": 0.3, "density": 0.6, "gamma": 0.1},
                {"weight": 0.7, "density": 0.9, "gamma": 0.01},
            ],
        ),
        "model_stock": models_recipe("model_stock", f, three, [{}, {}, {}]),
        "model_stock_filter_wise": models_recipe("model_stock", f, three, [{}, {}, {}], filter_wise=True),
        "nuslerp_base": models_recipe("nuslerp", f, ["a", "b"], [{"weight": [0.3, 0.8]}, {"weight": 0.5}]),
        "nuslerp_flat": models_recipe(
            "nuslerp", f, ["a", "b"], [{"weight": 0.3}, {"weight": 0.6}], base=False, nuslerp_flatten=False
        ),
        "nuslerp_rowwise": models_recipe(
            "nuslerp",
            f,
            ["a", "b"],
            [{"weight": 0.3}, {"weight": 0.6}],
            base=False,
            nuslerp_flatten=False,
            nuslerp_row_wise=True,
        ),
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(f["a"]), "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": str(f["b"]),
                            "layer_range": [1, 3],
                            "parameters": {
                                "scale": [
                                    {"filter": "o_proj", "value": 0.5},
                                    {"filter": "down_proj", "value": [0.25, 2.0]},
                                    {"value": 1.0},
                                ]
                            },
                        }
                    ]
                },
                {
                    "sources": [{"model": str(f["c"]), "layer_range": [2, 3]}],
                    "parameters": {"scale": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]},
                },
            ],
            "dtype": "float32",
        },
    }


def run_mergekit(recipe: dict, out: Path, **options: Any) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(Recipe.from_dict(recipe).to_yaml()))
    run_merge(config, str(out), options=MergeOptions(**{"copy_tokenizer": False, "quiet": True, **options}))
    return out


def assert_same_model(ours: Path, theirs: Path, atol: float = 1e-5) -> None:
    a, b = load_all(ours), load_all(theirs)
    assert a.keys() == b.keys(), f"tensor sets differ: {sorted(a.keys() ^ b.keys())}"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"
    ours_config = json.loads((ours / "config.json").read_text())
    theirs_config = json.loads((theirs / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]


@pytest.fixture(scope="module")
def recipes(random_family) -> dict[str, dict]:
    return deterministic_recipes(random_family)


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "linear_unnormalized",
        "slerp",
        "task_arithmetic",
        "ties",
        "ties_unnormalized",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "model_stock_filter_wise",
        "nuslerp_base",
        "nuslerp_flat",
        "nuslerp_rowwise",
        "passthrough",
    ],
)
def test_deterministic_methods_equal_mergekit(recipes, tmp_path, name) -> None:
    recipe = recipes[name]
    ours = merge_to_disk(Recipe.from_dict(recipe), tmp_path / "ours")
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    assert_same_model(ours, theirs)


@pytest.mark.parametrize("method", ["ties", "slerp", "task_arithmetic"])
def test_zoo_merges_equal_mergekit(zoo_dir, tmp_path, method) -> None:
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    family = {"base": zoo_dir / zoo["base"], **{k: zoo_dir / v for k, v in zoo["models"].items()}}
    skills = list(zoo["models"])
    if method == "slerp":
        recipe = {
            "merge_method": "slerp",
            "base_model": str(family[skills[0]]),
            "models": [{"model": str(family[skills[0]])}, {"model": str(family[skills[1]])}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": [0.8, 0.3]}]},
            "dtype": "float32",
        }
    else:
        params = [
            {"weight": [0.4, 1.0], "density": 0.6},
            {"weight": 0.8, "density": [0.9, 0.3]},
            {"weight": 0.7, "density": 0.5},
        ]
        if method == "task_arithmetic":
            params = [{"weight": p["weight"]} for p in params]
        recipe = models_recipe(method, family, skills[:3], params[: len(skills[:3])])
    assert_same_model(merge_to_disk(Recipe.from_dict(recipe), tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


# --- randomized methods --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> dict[str, Path]:
    """Bigger tensors, so kept fractions can be measured tightly."""
    from conftest import make_random_llama

    root = tmp_path_factory.mktemp("wide")
    base = make_random_llama(root / "base", 0, hidden=128, layers=2, vocab=256)
    return {
        "base": base,
        "a": make_random_llama(root / "a", 1, base=base),
        "b": make_random_llama(root / "b", 2, base=base),
    }


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_randomized_methods_are_seeded_and_keep_density(wide_family, tmp_path, method) -> None:
    density = 0.3
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    recipe = Recipe.from_dict(
        models_recipe(
            method, wide_family, ["a"], [{"weight": 1.0, "density": density, **extra}], normalize=False, rescale=True
        )
    )
    first = load_all(merge_to_disk(recipe, tmp_path / "s0", seed=0))
    again = load_all(merge_to_disk(recipe, tmp_path / "s0b", seed=0))
    other = load_all(merge_to_disk(recipe, tmp_path / "s1", seed=1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)

    base, tuned = load_all(wide_family["base"]), load_all(wide_family["a"])
    name = "model.layers.0.mlp.up_proj.weight"
    delta = tuned[name] - base[name]
    merged_delta = first[name] - base[name]
    kept = merged_delta.abs() > 1e-7
    assert kept.float().mean().item() == pytest.approx(density, abs=0.02)
    if method.startswith("dare"):
        # survivors share one rescaling factor: the one that keeps the task vector's L1 norm
        # (mergekit's rescale), which for a random mask is about 1/density
        factor = delta.abs().sum() / delta[kept].abs().sum()
        torch.testing.assert_close(merged_delta[kept], delta[kept] * factor, rtol=1e-4, atol=1e-6)
        assert factor.item() == pytest.approx(1 / density, rel=0.05)
    else:
        # della keeps large-magnitude entries more often, each rescaled by 1/its keep probability
        ranked = delta.abs().flatten().argsort()
        low, high = ranked[: len(ranked) // 4], ranked[-len(ranked) // 4 :]
        kept_flat = kept.flatten().float()
        assert kept_flat[high].mean() > kept_flat[low].mean() + 0.05
        assert (merged_delta[kept].abs() >= delta[kept].abs() * (1 - 1e-5)).all()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_randomized_methods_match_mergekit_in_distribution(wide_family, tmp_path, method) -> None:
    """Same recipe through mergekit (global RNG) and evomerge (seeded): same kept fraction and scale."""
    recipe = models_recipe(
        method, wide_family, ["a", "b"], [{"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.4}]
    )
    ours = load_all(merge_to_disk(Recipe.from_dict(recipe), tmp_path / "ours"))
    torch.manual_seed(0)
    theirs = load_all(run_mergekit(recipe, tmp_path / "mk"))
    base = load_all(wide_family["base"])
    name = "model.layers.1.self_attn.q_proj.weight"
    ours_delta, theirs_delta = ours[name] - base[name], theirs[name] - base[name]
    assert (ours_delta.abs() > 1e-7).float().mean().item() == pytest.approx(
        (theirs_delta.abs() > 1e-7).float().mean().item(), abs=0.03
    )
    assert ours_delta.abs().mean().item() == pytest.approx(theirs_delta.abs().mean().item(), rel=0.1)

"""Recipe: mergekit YAML in and out, validation that names the field, stable hashing."""

from __future__ import annotations

import copy

import pytest
import yaml

from evomerge.recipe import Recipe, RecipeError, evaluate_setting

TIES_YAML = """
merge_method: ties
base_model: /models/base
models:
  - model: /models/math
    parameters:
      weight: [0.2, 0.5, 0.8]
      density:
        - filter: self_attn
          value: 0.3
        - value: 0.7
  - model: /models/code
    parameters: {weight: 0.5, density: 0.5}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
"""

SLICES_YAML = """
merge_method: slerp
base_model: /models/a
slices:
  - sources:
      - model: /models/a
        layer_range: [0, 4]
      - model: /models/b
        layer_range: [0, 4]
parameters:
  t:
    - filter: mlp
      value: [0, 0.5, 1]
    - value: 0.5
dtype: float32
"""


@pytest.mark.parametrize("text", [TIES_YAML, SLICES_YAML])
def test_yaml_round_trip_is_exact(text: str) -> None:
    recipe = Recipe.from_yaml(text)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.content_hash() == recipe.content_hash()


@pytest.mark.parametrize("text", [TIES_YAML, SLICES_YAML])
def test_written_yaml_is_accepted_by_mergekit(text: str) -> None:
    from mergekit.config import MergeConfiguration

    recipe = Recipe.from_yaml(text)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert config.merge_method == recipe.merge_method
    assert yaml.safe_load(config.to_yaml()) == yaml.safe_load(recipe.to_yaml())


def test_hash_ignores_key_order_but_not_content() -> None:
    data = yaml.safe_load(TIES_YAML)
    reordered = dict(reversed(list(data.items())))
    reordered["models"] = [dict(reversed(list(m.items()))) for m in data["models"]]
    assert Recipe.from_dict(reordered).content_hash() == Recipe.from_dict(data).content_hash()
    changed = copy.deepcopy(data)
    changed["models"][1]["parameters"]["weight"] = 0.6
    assert Recipe.from_dict(changed).content_hash() != Recipe.from_dict(reordered).content_hash()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.update(merge_methd="ties"), "merge_methd: unknown field"),
        (lambda d: d["models"][0].update(modle="x"), "models.0.modle: unknown field"),
        (lambda d: d.update(merge_method="frobnicate"), "unknown method 'frobnicate'"),
        (
            lambda d: d["models"][1]["parameters"].update(density=1.5),
            "models[1].parameters.density: 1.5 is out of range",
        ),
        (
            lambda d: d["models"][1]["parameters"].update(t=0.5),
            "models[1].parameters.t: not a parameter of merge_method 'ties'",
        ),
        (lambda d: d["parameters"].update(normalize="yes"), "parameters.normalize: must be true or false"),
        (
            lambda d: d["models"][0]["parameters"].update(weight=[0.1, "x"]),
            "models[0].parameters.weight: must be a number",
        ),
        (lambda d: d.pop("base_model"), "base_model: merge_method 'ties' needs a base_model"),
        (lambda d: d.update(dtype="float8"), "dtype: Input should be"),
        (lambda d: d.update(slices=[]), "exactly one of 'models' or 'slices'"),
    ],
)
def test_invalid_recipes_name_the_field(edit, expected: str) -> None:
    data = yaml.safe_load(TIES_YAML)
    edit(data)
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert expected in str(info.value)


def test_layer_range_must_be_ordered() -> None:
    data = yaml.safe_load(SLICES_YAML)
    data["slices"][0]["sources"][1]["layer_range"] = [3, 1]
    with pytest.raises(RecipeError, match=r"slices.0.sources.1.layer_range: .*0 <= start < end"):
        Recipe.from_dict(data)


def test_unreadable_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(bad)


def test_gradients_and_filters_follow_mergekit() -> None:
    from mergekit.config import ConditionalParameter as MKConditional
    from mergekit.config import evaluate_setting as mk_evaluate

    settings = [
        [0.0, 1.0],
        [0.2, 0.5, 0.8, 0.1],
        [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}],
        [{"filter": "mlp", "value": 0.9}, {"filter": "*", "value": [1.0, 2.0, 4.0]}],
    ]
    recipe = Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": s}} for s in settings]}
    )
    for ours_setting, raw in zip([m.parameters["weight"] for m in recipe.models], settings):
        theirs_setting = [MKConditional(**c) for c in raw] if isinstance(raw[0], dict) else raw
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]:
            for t in [0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0]:
                ours = evaluate_setting(ours_setting, name, t)
                theirs = mk_evaluate(name, theirs_setting, t, validate=float)
                assert ours == pytest.approx(theirs, abs=1e-12), (raw, name, t)


def test_union_errors_are_one_readable_line() -> None:
    """A bad value in a union-typed field (scalar, gradient or filter list) is reported once, at the
    deepest path pydantic reached, without pydantic's per-branch type labels."""
    data = {
        "merge_method": "passthrough",
        "slices": [
            {
                "sources": [
                    {
                        "model": "/x",
                        "layer_range": [0, 2],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": None}]},
                    }
                ]
            }
        ],
    }
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    message = str(info.value)
    assert "slices.0.sources.0.parameters.scale.1.value: expected" in message
    assert "(got None)" in message
    assert "list[" not in message and "ConditionalParameter]" not in message and message.count(";") == 0

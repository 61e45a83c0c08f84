"""Layer routing folded into an ordinary checkpoint equals the scaled-input forward pass."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_random_llama
from torch import nn

from evomerge.merge.engine import merge_to_disk
from evomerge.merge.routing import Hop, RoutingError, recipe_to_routing, routing_to_recipe
from evomerge.recipe import Recipe


def reference_logits(hops: list[Hop], input_ids: torch.Tensor) -> torch.Tensor:
    """Stack the hops' layers unchanged and multiply each hop's residual input by its scale (pre-hooks)."""
    from transformers import AutoModelForCausalLM

    models = {
        m: AutoModelForCausalLM.from_pretrained(m, dtype=torch.float64) for m in dict.fromkeys(h.model for h in hops)
    }
    first, last = models[hops[0].model], models[hops[-1].model]
    config = copy.deepcopy(first.config)
    config.num_hidden_layers = len(hops)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * len(hops)
    stacked = type(first)(config).to(torch.float64)
    stacked.model.embed_tokens.load_state_dict(first.model.embed_tokens.state_dict())
    stacked.model.norm.load_state_dict(last.model.norm.state_dict())
    stacked.lm_head.load_state_dict(last.lm_head.state_dict())
    layers = []
    for index, hop in enumerate(hops):
        layer = copy.deepcopy(models[hop.model].model.layers[hop.layer])
        layer.self_attn.layer_idx = index

        def scale_input(module, args, kwargs, w=hop.scale):
            if args:
                return (args[0] * w, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * w}

        layer.register_forward_pre_hook(scale_input, with_kwargs=True)
        layers.append(layer)
    stacked.model.layers = nn.ModuleList(layers)
    stacked.eval()
    with torch.no_grad():
        return stacked(input_ids=input_ids, use_cache=False).logits


def folded_logits(checkpoint: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    error = (actual - expected).norm() / expected.norm()
    assert error.item() <= tolerance, f"relative error {error.item():.3g} > {tolerance}"


def check_fold(hops: list[Hop], out: Path, vocab: int) -> None:
    merge_to_disk(routing_to_recipe(hops), out)
    input_ids = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(hops, input_ids)
    assert_relative_close(folded_logits(out, input_ids), expected, 1e-4)
    # and the scales matter: the same path with every scale 1 gives different logits
    plain = reference_logits([Hop(h.model, h.layer, 1.0) for h in hops], input_ids)
    assert (plain - expected).norm() / expected.norm() > 1e-3


def test_routing_fold_on_zoo_models(zoo_dir, tmp_path) -> None:
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    a, b = (str(zoo_dir / path) for path in list(zoo["models"].values())[:2])
    hops = [Hop(a, 0, 1.0), Hop(b, 1, 0.7), Hop(a, 1, 1.3), Hop(b, 1, 0.9), Hop(a, 2, 1.0), Hop(b, 3, 1.6)]
    vocab = json.loads((Path(a) / "config.json").read_text())["vocab_size"]
    check_fold(hops, tmp_path / "routed", vocab)


def test_routing_fold_on_random_models(tmp_path) -> None:
    # Freshly initialised models have tiny activations (RMS ~0.02), where RMSNorm's eps is not
    # negligible; the fold is exact as eps -> 0, so these use eps = 1e-12 (trained zoo models above
    # keep their real eps).
    base = make_random_llama(tmp_path / "base", 0, rms_norm_eps=1e-12)
    a = str(make_random_llama(tmp_path / "a", 1, base=base))
    b = str(make_random_llama(tmp_path / "b", 2, base=base))
    hops = [Hop(b, 2, 0.5), Hop(a, 0, 2.0), Hop(a, 0, 1.5), Hop(b, 1, 0.8)]
    check_fold(hops, tmp_path / "routed", 64)


def test_recipe_round_trip_and_mergekit_form(random_family) -> None:
    import yaml
    from mergekit.config import MergeConfiguration

    hops = [
        Hop(str(random_family["a"]), 0, 1.0),
        Hop(str(random_family["b"]), 2, 0.5),
        Hop(str(random_family["a"]), 1, 4.0),
    ]
    recipe = routing_to_recipe(hops)
    back = recipe_to_routing(recipe)
    assert back is not None
    assert [(h.model, h.layer) for h in back] == [(h.model, h.layer) for h in hops]
    assert [h.scale for h in back] == pytest.approx([h.scale for h in hops])
    MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    scale = recipe.slices[2].sources[0].parameters["scale"]
    assert [c.filter for c in scale] == ["o_proj", "down_proj", None]
    assert scale[0].value == pytest.approx(1 / (1.0 * 0.5 * 4.0))


def test_routing_errors(random_family, tmp_path) -> None:
    with pytest.raises(RoutingError, match="at least one hop"):
        routing_to_recipe([])
    with pytest.raises(RoutingError, match=r"hops\[1\].scale: must be a finite number > 0"):
        routing_to_recipe([Hop(str(random_family["a"]), 0), Hop(str(random_family["a"]), 1, -1.0)])
    post_norm = tmp_path / "gpt2ish"
    shutil.copytree(random_family["a"], post_norm)
    config = json.loads((post_norm / "config.json").read_text())
    config["model_type"] = "gpt2"
    (post_norm / "config.json").write_text(json.dumps(config))
    with pytest.raises(RoutingError, match="not a pre-norm RMSNorm decoder"):
        routing_to_recipe([Hop(str(post_norm), 0, 0.5)])
    routing_to_recipe([Hop(str(post_norm), 0, 1.0)])  # no scaling: plain layer stacking is fine anywhere


@pytest.mark.parametrize(
    "scale",
    [
        [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.25}, {"value": 1.0}],  # unequal
        [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 3.0}],  # catch-all
        [  # another tensor scaled too
            {"filter": "o_proj", "value": 0.5},
            {"filter": "down_proj", "value": 0.5},
            {"filter": "q_proj", "value": 7.0},
            {"value": 1.0},
        ],
        [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}],  # down_proj left at 1.0
    ],
)
def test_a_passthrough_that_is_not_a_routing_is_not_read_as_one(random_family, scale) -> None:
    """Only what routing_to_recipe writes is a routing; anything else would be reported (and searched
    from) as a different model."""
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(random_family["a"]), "layer_range": [0, 1]}]},
                {
                    "sources": [
                        {"model": str(random_family["a"]), "layer_range": [1, 2], "parameters": {"scale": scale}}
                    ]
                },
            ],
        }
    )
    assert recipe_to_routing(recipe) is None

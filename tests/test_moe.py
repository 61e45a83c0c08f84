"""Mixture-of-experts assembly (``evomerge moe``): the same tensors as mergekit-moe on the same config
(the zoo's three specialists as experts), a checkpoint transformers loads and runs, a router that
sends a skill's prompts to that skill's expert, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.recipe import RecipeError
from evomerge.recipe.moe import MoEConfig

SKILLS = ("latin", "greek", "cyrillic")


def prompts(zoo_dir: Path, skill: str, n: int = 8) -> list[str]:
    lines = (zoo_dir / "tasks" / "data" / f"{skill}.search.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["query"] for line in lines]


def config(zoo_dir: Path, gate_mode: str, **extra) -> dict:
    return {
        "base_model": str(zoo_dir / "models" / "base"),
        "gate_mode": gate_mode,
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(zoo_dir / "models" / s), "positive_prompts": prompts(zoo_dir, s)} for s in SKILLS
        ],
        **extra,
    }


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def mergekit_moe(data: dict, out: Path) -> Path:
    pytest.importorskip("mergekit")
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(data), str(out), MergeOptions(copy_tokenizer=True), device="cpu")
    return out


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_the_same_tensors_as_mergekit_moe(zoo_dir, tmp_path, gate_mode) -> None:
    data = config(zoo_dir, gate_mode)
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["moe", str(tmp_path / "moe.yaml"), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    ours, theirs = tensors(tmp_path / "ours"), tensors(mergekit_moe(data, tmp_path / "mergekit"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    for key in ("architectures", "num_local_experts", "num_experts_per_tok", "hidden_size", "num_hidden_layers"):
        assert ours_cfg[key] == theirs_cfg[key], key
    from transformers import AutoTokenizer

    ours_tok, theirs_tok = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("ours", "mergekit"))
    assert ours_tok.get_vocab() == theirs_tok.get_vocab()
    for attribute in ("pad_token_id", "bos_token_id", "eos_token_id", "padding_side"):
        assert getattr(ours_tok, attribute) == getattr(theirs_tok, attribute), attribute


def test_a_mixture_of_one_model_computes_what_that_model_does(zoo_dir, tmp_path) -> None:
    """Mixtral renormalizes the chosen experts' weights: with every expert (and the base) the latin
    specialist, whatever the router says, the mixture is the specialist."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.moe import build_moe

    data = config(zoo_dir, "hidden", experts_per_token=2)
    latin = str(zoo_dir / "models" / "latin")
    data["base_model"] = latin
    for expert in data["experts"]:
        expert["source_model"] = latin
    out = build_moe(MoEConfig.model_validate(data), tmp_path / "moe")
    mixture, dense = (
        AutoModelForCausalLM.from_pretrained(out).eval(),
        AutoModelForCausalLM.from_pretrained(latin).eval(),
    )
    assert type(mixture).__name__ == "MixtralForCausalLM"
    inputs = torch.randint(4, dense.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            mixture(input_ids=inputs).logits, dense(input_ids=inputs).logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts_per_token": 4}, "experts_per_token: 4 is more than the 3 experts"),
        ({"shared_experts": [{"source_model": "x"}]}, "shared_experts: the Mixtral output has none"),
        ({"gate_mode": "learned"}, "gate_mode"),
        ({"architecture": "qwen"}, "evomerge writes Mixtral"),
    ],
)
def test_unusable_configs_are_refused_naming_the_field(zoo_dir, tmp_path, change, message) -> None:
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump({**config(zoo_dir, "hidden"), **change}))
    with pytest.raises(RecipeError, match=message):
        MoEConfig.load(path)


def test_an_expert_without_prompts_is_refused_for_a_prompted_gate(zoo_dir, tmp_path) -> None:
    data = config(zoo_dir, "hidden")
    data["experts"][1]["positive_prompts"] = []
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["moe", str(path), str(tmp_path / "out")])
    message = " ".join(result.output.split()).replace("[", ".").replace("]", "")  # rich wraps long lines
    assert result.exit_code == 2 and "experts.1.positive_prompts" in message
    assert not (tmp_path / "out").exists()

"""Permutation alignment (``evomerge align``): a permutation of a Llama's units changes nothing it
computes, weight matching recovers a permutation it is given, and the CLI writes a checkpoint that
loads and computes what the original does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge.align import AlignError, LlamaShape, identity, permute, weight_matching


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def random_perms(shape: LlamaShape, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randperm(size, generator=generator) for key, size in shape.sizes().items()}


@pytest.fixture(scope="module")
def base(zoo_dir):
    path = zoo_dir / "models" / "base"
    model = load(path)
    return path, model, LlamaShape.from_config(json.loads((path / "config.json").read_text()))


def test_a_permuted_model_computes_what_the_original_does(base) -> None:
    _, model, shape = base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randint(4, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        model.load_state_dict(permute(state, random_perms(shape, 0), shape))
        got = model(input_ids=inputs).logits
        model.load_state_dict(state)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # float summation order may differ


def test_weight_matching_recovers_a_permutation_exactly(base) -> None:
    _, model, shape = base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shuffled = permute(state, random_perms(shape, 3), shape)
    found = weight_matching(state, shuffled, shape)
    realigned = permute(shuffled, found, shape)
    assert all(torch.equal(realigned[k], state[k]) for k in state)
    unmoved = identity(shape)
    assert all(not torch.equal(found[k], unmoved[k]) for k in found)  # every permutation was undone


def test_models_of_different_shapes_are_refused_naming_the_tensor(base) -> None:
    _, model, shape = base
    state = dict(model.state_dict())
    other = dict(state)
    other["model.norm.weight"] = torch.ones(7)
    with pytest.raises(AlignError, match=r"model.norm.weight: shapes differ"):
        weight_matching(state, other, shape)


def test_the_cli_writes_an_aligned_checkpoint_that_computes_the_same(zoo_dir, tmp_path) -> None:
    reference, other = zoo_dir / "models" / "base", zoo_dir / "models" / "latin"
    out = tmp_path / "aligned"
    result = CliRunner().invoke(app, ["align", str(reference), str(other), str(out)])
    assert result.exit_code == 0, result.output
    assert "units moved" in result.output
    aligned, original = load(out), load(other)
    inputs = torch.randint(4, original.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            aligned(input_ids=inputs).logits, original(input_ids=inputs).logits, atol=1e-5, rtol=1e-5
        )
    again = CliRunner().invoke(app, ["align", str(reference), str(other), str(out)])
    assert again.exit_code == 2 and "--overwrite" in " ".join(
        again.output.split()
    )  # an existing output is not replaced silently


def test_activation_matching_recovers_a_permutation_exactly(base, zoo_dir) -> None:
    from transformers import AutoTokenizer

    from evomerge.merge.align import activation_matching

    path, model, shape = base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shuffled_model = load(path)
    shuffled_model.load_state_dict(permute(state, random_perms(shape, 5), shape))
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = (zoo_dir / "tasks" / "data" / "latin.search.jsonl").read_text().splitlines()[:60]
    ids = [tokenizer(json.loads(line)["query"] + json.loads(line)["target"])["input_ids"] for line in lines]
    found = activation_matching(model, shuffled_model, ids, shape)
    realigned = permute(shuffled_model.state_dict(), found, shape)
    assert all(torch.equal(realigned[k], state[k]) for k in state)


def test_the_cli_matches_activations_on_a_text_file(zoo_dir, tmp_path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("sub abc=\ncpy abc=abc.\n\n")
    out = tmp_path / "aligned"
    reference, other = zoo_dir / "models" / "base", zoo_dir / "models" / "greek"
    result = CliRunner().invoke(app, ["align", str(reference), str(other), str(out), "--data", str(texts)])
    assert result.exit_code == 0, result.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    refused = CliRunner().invoke(app, ["align", str(reference), str(other), str(tmp_path / "x"), "--data", str(empty)])
    assert refused.exit_code == 2 and "no text" in " ".join(refused.output.split())  # rich wraps long lines
    assert not (tmp_path / "x").exists()

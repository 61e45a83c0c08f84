"""Merging models whose tokenizers differ (``tokenizer_source``): the same tensors and output vocabulary as
mergekit on two zoo fine-tunes whose tokenizers have different added tokens, for the union, the base
and one model's tokenizer; and a clear refusal where no tokenizer_source says how to merge them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_mergekit_parity import run_mergekit

from evomerge.merge.engine import merge_to_disk
from evomerge.merge.plan import PlanError
from evomerge.recipe import Recipe


def with_added_tokens(source: Path, out: Path, tokens: list[str], seed: int) -> Path:
    """``source`` with ``tokens`` added to its tokenizer and (seeded random) rows for them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer.add_tokens(tokens)
    old = model.config.vocab_size
    model.resize_token_embeddings(len(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = 0.02 * torch.randn(weight[old:].shape, generator=generator)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(zoo_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": str(zoo_dir / "models" / "base"),
        "latin+": str(with_added_tokens(zoo_dir / "models" / "latin", root / "latin", ["<think>", "</think>"], 1)),
        "greek+": str(with_added_tokens(zoo_dir / "models" / "greek", root / "greek", ["<think>", "<tool>", "ξξ"], 2)),
        "cyrillic+": str(with_added_tokens(zoo_dir / "models" / "cyrillic", root / "cyrillic", ["<tool>"], 3)),
    }


def recipe(family: dict[str, str], method: str, source: str, three: bool = False) -> dict:
    weights = (("latin+", 0.6), ("greek+", 0.9)) + ((("cyrillic+", 0.7),) if three else ())
    out = {
        "merge_method": method,
        "models": [{"model": family[m], "parameters": {"weight": w}} for m, w in weights],
        "dtype": "float32",
        "tokenizer_source": family.get(source, source),
    }
    if method != "linear":
        out["base_model"] = family["base"]
    return out


def vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


@pytest.mark.parametrize(
    ("method", "source", "three"),
    [
        ("linear", "union", False),
        ("task_arithmetic", "union", False),
        ("ties", "union", False),
        ("task_arithmetic", "base", False),
        ("linear", "greek+", False),
        ("linear", "union", True),  # <tool> in two of three models and no base: the average of their rows
        ("task_arithmetic", "union", True),
    ],
)
def test_the_same_tensors_and_vocabulary_as_mergekit(family, tmp_path, method, source, three) -> None:
    """Token by token: mergekit orders the models it reads as a Python set (``list(set(...))``), so the
    ids its union gives the added tokens change from one process to the next; which row each token
    gets does not. evomerge takes the recipe's order."""
    pytest.importorskip("mergekit")
    from test_mergekit_parity import load_all

    data = recipe(family, method, source, three)
    ours = merge_to_disk(Recipe.from_dict(data), tmp_path / "ours")
    theirs = run_mergekit(data, tmp_path / "mergekit", copy_tokenizer=True)
    ours_vocab, theirs_vocab = vocab(ours), vocab(theirs)
    assert ours_vocab.keys() == theirs_vocab.keys()
    a, b = load_all(ours), load_all(theirs)
    assert a.keys() == b.keys()
    for name in a:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            order = torch.tensor([theirs_vocab[token] for token in sorted(ours_vocab, key=ours_vocab.get)])
            torch.testing.assert_close(a[name], b[name][order], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    size = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert size == len(vocab(ours))
    if source == "union":
        assert {"<think>", "</think>", "<tool>", "ξξ"} <= set(vocab(ours))


def test_the_union_model_loads_and_reads_every_token(family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_to_disk(Recipe.from_dict(recipe(family, "linear", "union")), tmp_path / "union")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("sub abc=<think>ξξ<tool>", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_different_vocabularies_without_a_tokenizer_source_are_refused(family) -> None:
    from evomerge.merge.plan import build_plan, open_checkpoints

    data = recipe(family, "linear", "union")
    del data["tokenizer_source"]
    parsed = Recipe.from_dict(data)
    with pytest.raises(PlanError, match=r"vocab sizes disagree.*tokenizer_source: base, union"):
        build_plan(parsed, open_checkpoints(parsed))


def test_a_union_recipe_scores_in_memory_as_its_merged_checkpoint_does(family, zoo_dir, tmp_path) -> None:
    from evomerge.eval.evaluator import CandidateEvaluator
    from evomerge.eval.tasks import Objective

    data = recipe(family, "task_arithmetic", "union")
    evaluator = CandidateEvaluator(
        [Objective(task="zoo_latin", metric="acc", limit=30), Objective(task="zoo_greek", metric="acc", limit=30)],
        include_paths=[zoo_dir / "tasks"],
    )
    in_memory = evaluator.evaluate(Recipe.from_dict(data))
    on_disk = evaluator.evaluate_checkpoint(merge_to_disk(Recipe.from_dict(data), tmp_path / "merged"))
    assert in_memory.ok and in_memory.objectives == on_disk.objectives


def test_a_relative_tokenizer_source_directory_is_read_against_the_recipes_directory(
    family, tmp_path, monkeypatch
) -> None:
    from test_mergekit_parity import load_all

    absolute = merge_to_disk(Recipe.from_dict(recipe(family, "linear", "greek+")), tmp_path / "absolute")
    data = recipe(family, "linear", "greek+")
    folder = Path(family["greek+"]).parent
    data["tokenizer_source"] = Path(family["greek+"]).name  # relative to the recipe's directory
    monkeypatch.chdir(tmp_path)  # not the recipe's directory
    relative = merge_to_disk(Recipe.from_dict(data), tmp_path / "relative", base_dir=folder)
    a, b = load_all(absolute), load_all(relative)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert vocab(absolute) == vocab(relative)

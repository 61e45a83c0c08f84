"""Rotation alignment (``evomerge align --rotate``): rotating a Llama's residual stream, values and RoPE
planes changes nothing it computes, the activations give back a rotation they are shown, and the CLI
writes a rotated checkpoint that computes what the original does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge.align import AlignError, LlamaShape, permute
from evomerge.merge.rotation import Rotations, check_rotatable, fit_rotations, rotate, rotation_alignment


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_rotations(shape: LlamaShape, seed: int) -> Rotations:
    g = torch.Generator().manual_seed(seed)
    return Rotations(
        residual=random_orthogonal(shape.hidden, g),
        values={
            layer: torch.stack([random_orthogonal(shape.head_dim, g) for _ in range(shape.kv_heads)])
            for layer in range(shape.layers)
        },
        planes={
            layer: (torch.rand((shape.kv_heads, shape.head_dim // 2), generator=g, dtype=torch.float64) - 0.5) * 6
            for layer in range(shape.layers)
        },
    )


def norms_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith("norm.weight")}


@pytest.fixture(scope="module")
def base(zoo_dir):
    path = zoo_dir / "models" / "base"
    return path, load(path), LlamaShape.from_config(json.loads((path / "config.json").read_text()))


@pytest.fixture(scope="module")
def texts(zoo_dir) -> list[str]:
    """Queries and answers of every skill: the stream's directions all get used (60 texts of one skill
    leave some of layer 0's value directions unseen, and those could not be recovered)."""
    rows = [
        json.loads(line)
        for skill in ("latin", "greek", "cyrillic")
        for line in (zoo_dir / "tasks" / "data" / f"{skill}.search.jsonl").read_text().splitlines()[:40]
    ]
    return [row["query"] + row["target"] for row in rows]


@pytest.mark.parametrize("other_norms", [False, True], ids=["own-norms", "reference-norms"])
def test_a_rotated_model_computes_what_the_original_does(base, other_norms: bool) -> None:
    _, model, shape = base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    norms = {k: v * 1.5 + 0.1 for k, v in norms_of(state).items()} if other_norms else None
    rotated = rotate(state, random_rotations(shape, 0), shape, norms)
    assert not torch.allclose(
        rotated["model.layers.1.self_attn.q_proj.weight"], state["model.layers.1.self_attn.q_proj.weight"]
    )
    if norms is not None:
        assert torch.equal(rotated["model.norm.weight"], norms["model.norm.weight"])
    inputs = torch.randint(4, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        model.load_state_dict(rotated)
        got = model(input_ids=inputs).logits
        model.load_state_dict(state)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # float64 transforms, float32 weights


def tiny_model(kind: str):
    """A randomly initialized model with grouped queries (4 query heads on 2 key/value heads) and biases,
    its norms and biases randomized too: what the zoo (4/4 heads, no biases) does not exercise."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, attention_bias=True, mlp_bias=True))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grouped_queries_and_biases_rotate_and_permute_exactly(kind: str) -> None:
    model = tiny_model(kind)
    shape = LlamaShape.from_config(model.config.to_dict())
    assert shape.kv_heads < shape.heads and any(k.endswith("q_proj.bias") for k in model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    perms = {key: torch.randperm(size, generator=g) for key, size in shape.sizes().items()}
    norms = {k: torch.randn(v.shape, generator=g) for k, v in norms_of(state).items()}
    inputs = torch.randint(0, 40, (2, 9), generator=g)
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        model.load_state_dict(permute(rotate(state, random_rotations(shape, 2), shape, norms), perms, shape))
        got = model(input_ids=inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rotation_alignment_recovers_a_rotation_and_permutation(base, texts) -> None:
    from transformers import AutoTokenizer

    path, model, shape = base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved = load(path)
    g = torch.Generator().manual_seed(5)
    perms = {key: torch.randperm(size, generator=g) for key, size in shape.sizes().items()}
    moved.load_state_dict(permute(rotate(state, random_rotations(shape, 4), shape), perms, shape))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    perms, found = rotation_alignment(model, moved, ids, shape)
    back = rotate(permute(moved.state_dict(), perms, shape), found, shape, norms_of(state))
    worst = max(float((back[k] - state[k]).abs().max()) for k in state)
    assert worst < 1e-4, worst  # the weights themselves come back, not just the function


def midpoint_loss(model, a: dict, b: dict, ids: list[list[int]]) -> float:
    """Next-token loss of the midpoint of two state dicts on ``ids``."""
    from torch.func import functional_call

    from evomerge.merge.align import padded_batches

    ((batch, mask),) = padded_batches(ids, 0, size=len(ids))
    with torch.no_grad():
        logits = functional_call(
            model, {k: 0.5 * (a[k] + b[k]) for k in a}, args=(), kwargs={"input_ids": batch, "attention_mask": mask}
        ).logits
    labels = batch[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
        )
    )


def test_fitting_rotations_lowers_the_midpoint_loss_and_keeps_the_function(base, texts) -> None:
    """B is the base turned by random rotations; from no rotation at all (so the midpoint averages
    unrelated directions) the fit must find its way back towards the base's basis."""
    from transformers import AutoTokenizer

    path, model, shape = base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    turned = rotate(state, random_rotations(shape, 7), shape)
    ids = [AutoTokenizer.from_pretrained(path)(text)["input_ids"] for text in texts]
    start = Rotations.identity(shape)
    before = midpoint_loss(model, state, rotate(turned, start, shape, norms_of(state)), ids)
    fitted = fit_rotations(model, turned, start, shape, ids, norms=norms_of(state), steps=60, lr=0.02)
    aligned = rotate(turned, fitted, shape, norms_of(state))
    after = midpoint_loss(model, state, aligned, ids)
    own = midpoint_loss(model, state, state, ids)  # the base's own loss: where a perfect alignment ends
    assert after - own < 0.5 * (before - own), (own, before, after)  # closes more than half the gap
    inputs = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits  # the base computes what the turned model computes
        model.load_state_dict(aligned)
        got = model(input_ids=inputs).logits
        model.load_state_dict(state)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_are_refused_naming_the_field() -> None:
    with pytest.raises(AlignError, match="tie_word_embeddings"):
        check_rotatable({"model.embed_tokens.weight": torch.zeros(2, 2)}, {"tie_word_embeddings": True})


def test_the_cli_rotates_and_writes_a_checkpoint_that_computes_the_same(zoo_dir, tmp_path, texts) -> None:
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    reference, other = zoo_dir / "models" / "base", zoo_dir / "models" / "greek"
    out = tmp_path / "aligned"
    result = CliRunner().invoke(
        app, ["align", str(reference), str(other), str(out), "--data", str(data), "--rotate", "--fit-steps", "10"]
    )
    assert result.exit_code == 0, result.output
    aligned, original, ref = load(out), load(other), load(reference)
    torch.testing.assert_close(aligned.model.norm.weight, ref.model.norm.weight)  # the reference's norms
    inputs = torch.randint(4, original.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            aligned(input_ids=inputs).logits, original(input_ids=inputs).logits, atol=1e-4, rtol=1e-4
        )
    refused = CliRunner().invoke(app, ["align", str(reference), str(other), str(tmp_path / "x"), "--rotate"])
    assert refused.exit_code == 2 and "--data" in " ".join(refused.output.split())
    unused = CliRunner().invoke(app, ["align", str(reference), str(other), str(tmp_path / "x"), "--fit-steps", "5"])
    assert unused.exit_code == 2 and "--rotate" in " ".join(unused.output.split())
    assert not (tmp_path / "x").exists()

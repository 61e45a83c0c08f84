"""A small greedy exact-match scorer and naive merges, used to check and report the zoo's quality.

``greedy_exact_match`` scores an item the way lm-eval's ``loglikelihood`` ``acc`` does (``is_greedy``):
the context and continuation are encoded as lm-eval's HFLM encodes them (trailing context whitespace
moved into the continuation, ``whole = encode(context + continuation)``, continuation tokens = the tail
of ``whole`` after ``encode(context)``), the model reads ``whole[:-1]`` in one forward pass, and the item
counts when every continuation token is the argmax at its position. This equals token-by-token greedy
generation of the target, at the cost of one batched forward pass.

The merges here are deliberately hand-rolled on state dicts (no dependency on ``evomerge.merge``): they
only check that the zoo leaves something to search for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM's ``_encode_pair`` for a causal model with default special-token handling."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def greedy_hits(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, str]],
    *,
    batch_size: int = 256,
) -> list[bool]:
    """Per item: is the ``target`` the model's greedy continuation of the ``query``?"""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pairs = [encode_pair(tokenizer, it["query"], it["target"]) for it in chunk]
            seqs = [(c + t)[:-1] for c, t in pairs]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            # Right padding with a causal mask: pads only follow the scored positions, so they
            # change nothing that is read (as in lm-eval's HFLM batches).
            preds = model(input_ids=ids).logits.argmax(-1)
            for i, (c, t) in enumerate(pairs):
                lo = len(c) - 1
                got = preds[i, lo : lo + len(t)].tolist()
                hits.append(got == t)
    finally:
        model.train(was_training)
    return hits


def greedy_exact_match(model: torch.nn.Module, tokenizer: Any, items: Sequence[Mapping[str, str]], **kw: Any) -> float:
    """Fraction of items whose target is the greedy continuation (lm-eval ``acc`` on a loglikelihood task)."""
    hits = greedy_hits(model, tokenizer, items, **kw)
    return sum(hits) / max(len(hits), 1)


def task_arithmetic(base: StateDict, models: Sequence[StateDict], weights: Sequence[float]) -> dict[str, Tensor]:
    """``base + sum_i w_i * (model_i - base)`` for every tensor (no normalization)."""
    out: dict[str, Tensor] = {}
    for name, b in base.items():
        acc = b.detach().clone().to(torch.float64)
        for sd, w in zip(models, weights, strict=True):
            acc += w * (sd[name].to(torch.float64) - b.to(torch.float64))
        out[name] = acc.to(b.dtype)
    return out


def linear_average(models: Sequence[StateDict]) -> dict[str, Tensor]:
    """Plain mean of the models' tensors."""
    out: dict[str, Tensor] = {}
    for name, first in models[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for sd in models:
            acc += sd[name].to(torch.float64)
        out[name] = (acc / len(models)).to(first.dtype)
    return out


def naive_merges(base: StateDict, specialists: Mapping[str, StateDict]) -> dict[str, dict[str, Tensor]]:
    """The hand-set merges the zoo report compares against: task arithmetic at 1.0 and 0.5, linear mean."""
    sds = list(specialists.values())
    return {
        "task_arithmetic_w1.0": task_arithmetic(base, sds, [1.0] * len(sds)),
        "task_arithmetic_w0.5": task_arithmetic(base, sds, [0.5] * len(sds)),
        "linear_average": linear_average(sds),
    }


def score_table(
    model: torch.nn.Module,
    tokenizer: Any,
    state_dicts: Mapping[str, StateDict],
    items: Mapping[str, Sequence[Mapping[str, str]]],
) -> dict[str, dict[str, float]]:
    """``{row: {skill: acc}}``: each state dict loaded into ``model`` in turn and scored on every skill.

    ``model``'s own weights are restored afterwards.
    """
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    table: dict[str, dict[str, float]] = {}
    try:
        for row, sd in state_dicts.items():
            model.load_state_dict(sd, strict=True)
            table[row] = {skill: greedy_exact_match(model, tokenizer, its) for skill, its in items.items()}
    finally:
        model.load_state_dict(own, strict=True)
    return table


def retention(table: Mapping[str, Mapping[str, float]], specialists: Mapping[str, str], row: str) -> float:
    """Mean own-skill score of merge ``row`` divided by the specialists' mean own-skill score.

    ``specialists`` maps skill -> the table row of that skill's specialist.
    """
    spec = sum(table[r][s] for s, r in specialists.items()) / len(specialists)
    merged = sum(table[row][s] for s in specialists) / len(specialists)
    return merged / spec if spec > 0 else 0.0

"""A small greedy exact-match scorer and naive merges, used to check and report the zoo's quality.

``greedy_exact_match`` scores an item the way lm-eval's ``loglikelihood`` ``acc`` does (``is_greedy``):
the context and continuation are encoded as lm-eval's HFLM encodes them (trailing context whitespace
moved into the continuation, ``whole = encode(context + continuation)``, continuation tokens = the tail
of ``whole`` after ``encode(context)``), the model reads ``whole[:-1]`` in one forward pass, and the item
counts when every continuation token is the argmax at its position. This equals token-by-token greedy
generation of the target, at the cost of one batched forward pass.

The hand-set merges of the report (uniform linear, task arithmetic, TIES, DARE-TIES) are recipes
merged by evomerge's engine into a resident model, as in a search (held to mergekit by the parity
tests), so the report's numbers are the ones ``evomerge zoo compare`` and the benchmarks print.
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


#: The hand-set merges the zoo is judged by: (label, method, weight per model, density).
HAND_SET_MERGES: tuple[tuple[str, str, float, float | None], ...] = (
    ("linear (uniform)", "linear", 1.0, None),
    ("task arithmetic (λ=0.5)", "task_arithmetic", 0.5, None),
    ("task arithmetic (λ=1.0)", "task_arithmetic", 1.0, None),
    ("TIES (w=1, density=0.5)", "ties", 1.0, 0.5),
    ("DARE-TIES (w=1, density=0.5)", "dare_ties", 1.0, 0.5),
)


def hand_set_recipes(base: str, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``HAND_SET_MERGES`` as recipe dicts over ``models`` (checkpoint paths), the base where the
    method takes one; everything else at mergekit's defaults."""
    out: dict[str, dict[str, Any]] = {}
    for label, method, weight, density in HAND_SET_MERGES:
        params = {"weight": weight} | ({"density": density} if density is not None else {})
        recipe: dict[str, Any] = {
            "merge_method": method,
            "models": [{"model": str(m), "parameters": dict(params)} for m in models],
            "dtype": "float32",
        }
        if method != "linear":
            recipe["base_model"] = str(base)
        out[label] = recipe
    return out


def load_recipe_into(model: torch.nn.Module, recipe: Mapping[str, Any]) -> None:
    """Merge ``recipe`` into ``model``'s parameters in place with evomerge's engine (as a search
    worker does), so the report's merges are the ones a recipe gives everywhere else."""
    from evomerge.merge.engine import materialize_into, plan_recipe
    from evomerge.recipe import Recipe

    materialize_into(model, plan_recipe(Recipe.from_dict(dict(recipe), source="zoo report")))


def score_table(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Mapping[str, StateDict | Mapping[str, Any]],
    items: Mapping[str, Sequence[Mapping[str, str]]],
) -> dict[str, dict[str, float]]:
    """``{row: {skill: acc}}``: each row (a state dict, or a recipe dict merged by the engine) loaded
    into ``model`` in turn and scored on every skill. ``model``'s own weights are restored afterwards.
    """
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    table: dict[str, dict[str, float]] = {}
    try:
        for row, what in rows.items():
            if "merge_method" in what:
                load_recipe_into(model, what)
            else:
                model.load_state_dict(what, strict=True)
            table[row] = {skill: greedy_exact_match(model, tokenizer, its) for skill, its in items.items()}
    finally:
        model.load_state_dict(own, strict=True)
    return table


def gain_retention(merged: float, base: float, specialist: float) -> float:
    """(merge - base) / (specialist - base): the share of the fine-tune's gain over its base a merge keeps.

    1 = all of it, 0 = none (the base's score), negative = worse than the base. A specialist that
    gained nothing leaves the ratio undefined: ``nan``.
    """
    gain = specialist - base
    return (merged - base) / gain if gain > 0 else float("nan")


def retention_table(
    table: Mapping[str, Mapping[str, float]], specialists: Mapping[str, str], base_row: str = "base"
) -> dict[str, dict[str, float]]:
    """``{row: {skill: gain retention, ..., "mean": ..., "min": ...}}`` for every row of ``table``.

    ``specialists`` maps skill -> the table row of that skill's specialist.
    """
    out: dict[str, dict[str, float]] = {}
    for row, scores in table.items():
        per = {s: gain_retention(scores[s], table[base_row][s], table[spec][s]) for s, spec in specialists.items()}
        vals = list(per.values())
        out[row] = {**per, "mean": sum(vals) / len(vals), "min": min(vals)}
    return out


def task_vector_stats(base: StateDict, specialists: Mapping[str, StateDict]) -> dict[str, Any]:
    """Per specialist the relative task-vector size ‖τ‖ / ‖θ_base‖ (over all tensors), and the cosine
    of every pair of task vectors: how large and how overlapping the fine-tunes' changes are."""
    names = list(base)
    theta = torch.cat([base[n].detach().flatten().to(torch.float64) for n in names])
    taus = {
        k: torch.cat([(sd[n].detach().to(torch.float64) - base[n].detach().to(torch.float64)).flatten() for n in names])
        for k, sd in specialists.items()
    }
    keys = list(taus)
    cosines = {
        f"{a}/{b}": float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0))
        for i, a in enumerate(keys)
        for b in keys[i + 1 :]
    }
    return {"relative_size": {k: float(t.norm() / theta.norm()) for k, t in taus.items()}, "cosine": cosines}

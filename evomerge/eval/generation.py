"""Greedy generation for lm-eval's ``generate_until`` requests, batched with a KV cache.

lm-eval's ``HFLM.generate_until`` re-tokenizes every request on each call, runs ``model.generate`` in
batches of its batch size, and stops a batch only when every sequence in it has produced a stop
string (decoding the batch's last tokens at every step). A search scores the same requests for every
candidate, so here they are encoded once, by HFLM's own rules (``tok_batch_encode``,
``normalize_gen_kwargs``, ``handle_stop_sequences``), and each candidate only runs the decode loop:
left-padded prefill, then one token per step from the cache, a sequence leaving the batch's work as
soon as it ends (its end-of-sequence token, a stop string, or ``max_gen_toks``). Texts are decoded
and cut at the first stop string exactly as lm-eval does (``postprocess_generated_text``), so the
task's own filters and metrics see the same responses (a test holds them to ``HFLM``'s).

Greedy only: a request that samples (``do_sample: true`` or a temperature above 0) is refused when
the requests are encoded, naming the task, so that the lm-eval backend is used for it instead.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

GREEDY_NEUTRAL = frozenset({"do_sample", "temperature", "top_p", "top_k"})
"""Generation settings that change nothing when decoding greedily (sampling itself is refused)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One ``generate_until`` request, encoded once: the context's tokens and when to stop."""

    context: tuple[int, ...]
    until: tuple[str, ...]
    """Stop strings, the tokenizer's end-of-text string among them (as lm-eval adds it)."""
    max_gen_toks: int


def encode_generation(lm: Any, instance: Any, task_name: str) -> GenerationRequest:
    """A ``generate_until`` instance as ``HFLM.generate_until`` would run it (same tokens, stops, length)."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    context, gen_kwargs = instance.args
    kwargs = normalize_gen_kwargs(copy.deepcopy(dict(gen_kwargs)), lm.max_gen_toks)
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        raise ValueError(
            f"task {task_name}: its generation samples (do_sample / temperature > 0); the fast backend decodes "
            "greedily only: use --backend lm-eval (runtime.backend: lm-eval)"
        )
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = int(kwargs.pop("max_gen_toks"))
    other = sorted(set(kwargs) - GREEDY_NEUTRAL)
    if other:  # they would change what model.generate produces; the greedy loop does not apply them
        raise ValueError(
            f"task {task_name}: generation_kwargs {', '.join(other)} are not applied by the fast backend's greedy "
            "decoding (it takes until, max_gen_toks, and do_sample: false); use --backend lm-eval"
        )
    if lm.max_length - max_gen_toks <= 0:
        raise ValueError(
            f"task {task_name}: max_gen_toks {max_gen_toks} leaves no room for a context (max length {lm.max_length})"
        )
    ids, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - max_gen_toks, truncation=lm.truncation)
    return GenerationRequest(tuple(int(t) for t in ids[0].tolist()), tuple(until), max_gen_toks)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    requests: Sequence[GenerationRequest],
    decode: Callable[..., str],
    *,
    pad_token_id: int,
    batch_tokens: int = 16384,
) -> list[str]:
    """Each request's generated text, cut at its first stop string (lm-eval's post-processing).

    ``decode(tokens, skip_special_tokens=...)`` is the tokenizer's (HFLM's ``tok_decode``). A sequence
    ends at one of the model's end-of-sequence ids (``generation_config.eos_token_id``, as
    ``model.generate`` does), once its text holds a stop string, or after ``max_gen_toks`` tokens."""
    from lm_eval.models.utils import postprocess_generated_text

    device = next(model.parameters()).device
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    texts: list[str] = [""] * len(requests)
    for batch in _batches(requests, batch_tokens):
        for index, tokens in zip(
            batch, _decode_batch(model, [requests[i] for i in batch], decode, eos_ids, pad_token_id, device)
        ):
            request = requests[index]
            texts[index] = postprocess_generated_text(decode(tokens), list(request.until), None)
    return texts


#: A batch's contexts are at least this share of its longest one: left padding (computed, then masked)
#: stays under about a tenth of the prefill, without a batch per context length.
PAD_SHARE = 0.9


def _batches(requests: Sequence[GenerationRequest], batch_tokens: int) -> list[list[int]]:
    """Request indices in batches, longest contexts first: at most ``batch_tokens`` tokens of context and
    generation per batch, and contexts of similar length together (``PAD_SHARE``)."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].context), i))
    batches: list[list[int]] = []
    longest_generation = 0  # of the open batch
    for index in order:
        request = requests[index]
        if batches:
            batch = batches[-1]
            head = requests[batch[0]]
            width = len(head.context) + max(longest_generation, request.max_gen_toks)
            if len(request.context) >= PAD_SHARE * len(head.context) and (len(batch) + 1) * width <= batch_tokens:
                batch.append(index)
                longest_generation = max(longest_generation, request.max_gen_toks)
                continue
        batches.append([index])
        longest_generation = request.max_gen_toks
    return batches


#: Shared prefixes shorter than this are not worth a separate forward pass.
MIN_SHARED_PREFIX = 2


def _common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    """Tokens every context starts with, leaving each at least one token of its own (its last position
    gives its first generated token)."""
    shortest = min(len(c) for c in contexts)
    length = 0
    while length < shortest - 1 and all(c[length] == contexts[0][length] for c in contexts):
        length += 1
    return length


def _prefill(
    model: torch.nn.Module,
    batch: Sequence[GenerationRequest],
    pad_token_id: int,
    device: torch.device,
    cache_name: str,
    last_only: dict[str, int],
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Run the contexts: (the model's output with its cache, the attention mask so far, the positions).

    Without a shared prefix: one left-padded batch, positions as ``model.generate`` makes them. With
    one: the prefix once, its cache repeated for every row, then each row's own tokens left-padded
    after it (padding in the middle, masked); every real token has the position it would have alone."""
    contexts = [r.context for r in batch]
    shared = _common_prefix(contexts) if len(batch) > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    prefix_out = None
    if shared:
        prefix = torch.tensor([contexts[0][:shared]], device=device)
        prefix_out = model(
            input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], use_cache=True, **last_only
        )
        cache = getattr(prefix_out, cache_name)
        if not hasattr(cache, "batch_repeat_interleave"):
            shared, prefix_out = 0, None
        else:
            cache.batch_repeat_interleave(len(batch))
    width = max(len(c) for c in contexts) - shared
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    own = torch.zeros((len(batch), width), dtype=torch.long)
    for row, context in enumerate(contexts):
        tail = context[shared:]
        if tail:
            ids[row, width - len(tail) :] = torch.tensor(tail)
            own[row, width - len(tail) :] = 1
    ids, own = ids.to(device), own.to(device)
    positions = (own.cumsum(-1) - 1 + shared).masked_fill(own == 0, 1)
    mask = torch.cat([torch.ones((len(batch), shared), dtype=own.dtype, device=device), own], dim=1)
    if prefix_out is None:
        padded = bool((mask == 0).any())
        out = model(
            input_ids=ids, attention_mask=mask if padded else None, position_ids=positions, use_cache=True, **last_only
        )
    else:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_name: getattr(prefix_out, cache_name)},
            **last_only,
        )
    return out, mask, positions


def _decode_batch(
    model: torch.nn.Module,
    batch: Sequence[GenerationRequest],
    decode: Callable[..., str],
    eos_ids: set[int],
    pad_token_id: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy tokens of one left-padded batch, from a KV cache, until every sequence has ended. The
    contexts' longest common prefix (few-shot examples, an instruction) is run once and its cache
    shared by every row (``_prefill``)."""
    accepted = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in accepted else "past_key_values"  # transformers 5.x renamed it
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    out, mask, positions = _prefill(model, batch, pad_token_id, device, cache_name, last_only)
    padded = bool((mask == 0).any())  # contexts of one length: no mask at all (the plain causal path)
    generated: list[list[int]] = [[] for _ in batch]
    rows = list(range(len(batch)))  # the batch's rows still in the model's batch (finished ones leave it)
    done: set[int] = set()  # finished rows kept in the model's batch (a cache that cannot drop rows)
    while True:
        logits = out.logits[:, -1, :].float()
        if not torch.isfinite(logits).all():
            from evomerge.eval.scorer import ScoringError

            raise ScoringError("the model produced NaN or Inf logits while generating")
        chosen = logits.argmax(dim=-1).tolist()
        keep = []
        for slot, row in enumerate(rows):
            if row in done:
                continue
            token = int(chosen[slot])
            if token in eos_ids:
                continue
            generated[row].append(token)
            request = batch[row]
            if len(generated[row]) >= request.max_gen_toks:
                continue
            # the stop check lm-eval's criteria make (special tokens kept), on this sequence only
            text = decode(generated[row], skip_special_tokens=False)
            if any(stop and stop in text for stop in request.until):
                continue
            keep.append(slot)
        if not keep:
            return generated
        cache = getattr(out, cache_name)
        if len(keep) < len(rows) and hasattr(cache, "batch_select_indices"):  # drop finished rows from the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            rows, step = [rows[k] for k in keep], [chosen[k] for k in keep]
        else:  # every row steps (finished ones are not read again)
            kept = set(keep)
            done.update(row for slot, row in enumerate(rows) if slot not in kept)
            step = chosen
        mask = torch.cat([mask, torch.ones((len(step), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        tokens = torch.tensor(step, device=device)[:, None]
        out = model(
            input_ids=tokens,
            attention_mask=mask if padded else None,
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
        )

"""Task items as token rows, for code that needs the model's outputs on them with gradients (the
gradient optimizer's loss) or its activations (the statistics of data-aware merges).

The rows are built by lm-eval's own request construction and tokenization (``FastScorer``'s encoding),
so they are exactly the contexts and continuations a candidate is scored on: a ``loglikelihood`` task
gives one row per item (context + reference continuation), a ``multiple_choice`` task one row per choice
and the gold choice per item, read as lm-eval's ``process_results`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.eval.tasks import Objective, PreparedTask


@dataclass
class TokenItems:
    """One objective's items as token rows: for a ``loglikelihood`` task one row per item (its reference
    continuation), for a ``multiple_choice`` task one row per choice and the gold choice per item."""

    ids: Any  # (rows, width) token ids, right-padded (causal, so padding is inert)
    lengths: Any  # (rows,) each row's token count (the rest is padding)
    mask: Any  # (rows, width) the positions that predict a continuation token
    targets: Any  # (rows, width) the token each masked position should predict
    row_item: Any  # (rows,) the item a row belongs to, 0..count-1 in order
    row_choice: Any  # (rows,) the row's choice number within its item
    gold: Any | None  # (items,) the gold choice per item; None for a loglikelihood task

    @property
    def count(self) -> int:
        return int(self.row_item[-1]) + 1

    def chunks(self, batch_tokens: int) -> list[TokenItems]:
        """Whole items in chunks of at most ``batch_tokens`` tokens (at least one item each)."""
        rows_per_chunk = max(1, batch_tokens // max(1, self.ids.shape[1]))
        out, first = [], 0
        while first < len(self.ids):
            last = min(first + rows_per_chunk, len(self.ids))
            while last < len(self.ids) and self.row_item[last] == self.row_item[last - 1]:
                last += 1  # never split an item's choices
            rows = slice(first, last)
            base = int(self.row_item[first])
            gold = None if self.gold is None else self.gold[base : int(self.row_item[last - 1]) + 1]
            out.append(
                TokenItems(
                    self.ids[rows],
                    self.lengths[rows],
                    self.mask[rows],
                    self.targets[rows],
                    self.row_item[rows] - base,
                    self.row_choice[rows],
                    gold,
                )
            )
            first = last
        return out

    def loss_sum(self, logits: Any, loss: str = "nll") -> Any:
        """Summed over items. ``nll`` (supervised): the per-token NLL of the reference continuation
        (loglikelihood), or the cross-entropy of the gold choice among the choices' log-likelihoods
        (multiple choice). ``entropy`` (AdaMerging's unsupervised loss: no answer is read): the entropy
        of the next-token distribution where the answer starts, or of the distribution over the choices."""
        import torch
        import torch.nn.functional as F

        if loss == "entropy" and self.gold is None:
            first = self.mask.float().argmax(1)  # the position that predicts the first answer token
            start = logits[torch.arange(len(logits), device=logits.device), first].float()
            return -(F.softmax(start, -1) * F.log_softmax(start, -1)).sum()
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), self.targets, reduction="none")
        row_nll = (token_nll * self.mask).sum(1)
        if self.gold is None:
            return (row_nll / self.mask.sum(1).clamp(min=1)).sum()
        table = torch.full((self.count, int(self.row_choice.max()) + 1), -math.inf, device=logits.device)
        table = table.index_put((self.row_item, self.row_choice), -row_nll)
        if loss == "entropy":
            log_p = torch.log_softmax(table, dim=1)
            return -torch.where(torch.isfinite(log_p), log_p.exp() * log_p, torch.zeros_like(log_p)).sum()
        gold_ll = table[torch.arange(self.count, device=logits.device), self.gold]
        return (torch.logsumexp(table, dim=1) - gold_ll).sum()


def token_items(
    prepared: Sequence[PreparedTask],
    objectives: Sequence[Objective],
    model: Any,
    tokenizer: Any,
    device: str,
    *,
    who: str = "data",
) -> list[TokenItems]:
    """Per objective (``prepare_tasks``' output), its items as token rows on ``device``; ``who`` names the
    caller in errors (tasks must be ``loglikelihood`` or ``multiple_choice``)."""
    import torch

    from evomerge.eval.scorer import FastScorer, make_hflm

    for item in prepared:
        if item.output_type not in ("loglikelihood", "multiple_choice"):
            raise ValueError(
                f"{who}: task {item.name} has output_type {item.output_type}; it needs loglikelihood or "
                "multiple_choice tasks (a reference continuation, or a gold choice, per item)"
            )
    scorer = FastScorer(list(prepared), make_hflm(model, tokenizer))
    by_label = {
        label: (item, windows) for item, windows in zip(prepared, scorer.windows) for label in item.objective_labels
    }
    out = []
    for objective in objectives:
        item, windows = by_label[objective.label]
        rows: list[tuple[Any, int, int]] = []  # (token window, item number, choice number)
        gold: list[int] | None = [] if item.output_type == "multiple_choice" else None
        for number, (doc_windows, instances) in enumerate(zip(windows, item.instances_by_doc)):
            if gold is not None:
                gold.append(gold_choice(item, instances, who))
            for choice, instance_windows in enumerate(doc_windows):
                rows.extend((window, number, choice) for window in instance_windows)
        width = max(len(window.tokens) for window, _, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        targets = torch.zeros_like(ids)
        for row, (window, _, _) in enumerate(rows):
            n, k = len(window.tokens), len(window.target)
            ids[row, :n] = torch.tensor(window.tokens)
            mask[row, n - k : n] = True
            targets[row, n - k : n] = torch.tensor(window.target)
        out.append(
            TokenItems(
                ids.to(device),
                torch.tensor([len(window.tokens) for window, _, _ in rows], device=device),
                mask.to(device),
                targets.to(device),
                torch.tensor([r[1] for r in rows], device=device),
                torch.tensor([r[2] for r in rows], device=device),
                None if gold is None else torch.tensor(gold, device=device),
            )
        )
    return out


def gold_choice(item: PreparedTask, instances: Sequence[Any], who: str = "data") -> int:
    """The gold choice of a multiple-choice document, read as lm-eval's ``process_results`` reads it."""
    task, doc = item.task, instances[0].doc
    choices = task.doc_to_choice(doc)
    if (
        getattr(task, "multiple_input", False)
        or getattr(task, "multiple_target", False)
        or len(instances) != len(choices)
    ):
        raise ValueError(
            f"{who}: task {item.name}: multiple inputs, multiple targets or mutual-information "
            "scoring are not supported (one gold choice per item is)"
        )
    gold = task.doc_to_target(doc)
    index = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
    if not isinstance(index, int) or not 0 <= index < len(choices):
        raise ValueError(f"{who}: task {item.name}: gold {gold!r} is not one of the {len(choices)} choices")
    return index

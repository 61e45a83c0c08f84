"""Two scoring backends over a resident model, giving the same numbers.

- ``LmEvalScorer``: lm-eval's own evaluator (``simple_evaluate``) over an ``HFLM`` that wraps the
  in-memory model. The reference.
- ``FastScorer``: the same lm-eval requests, tokenized once with the same ``HFLM`` encoding rules, then
  per candidate only batched forward passes; responses go back through the task's own filters,
  ``process_results`` and aggregation, so metrics are computed by lm-eval's code, not a copy of it.

Both return ``{task_key: {metric: value}}`` where ``task_key`` is ``PreparedTask.key``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from evomerge.eval.tasks import PreparedTask

TaskKey = tuple[str, str, tuple[int, ...]]
Scores = dict[TaskKey, dict[str, float]]

LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
GENERATION_TYPES = ("generate_until",)


class ScoringError(RuntimeError):
    """The model produced something that cannot be scored (e.g. NaN logits)."""


def make_hflm(model: torch.nn.Module, tokenizer: Any, batch_size: int = 64) -> Any:
    """lm-eval's HF wrapper around an in-memory model (no loading, no copy)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


ItemValues = dict[TaskKey, dict[str, list[float]]]
"""Per selection and metric, each item's value (in the selection's order): what ``aggregate`` averages."""


def aggregate(
    item: PreparedTask, responses: Sequence[Sequence[Any]], items: dict[str, list[float]] | None = None
) -> dict[str, float]:
    """Per-document responses -> the task's metrics, through lm-eval's filters and aggregations. With
    ``items``, each numeric metric's per-document values (e.g. 0/1 for ``acc``) are put there too."""
    task = item.task
    for instances, values in zip(item.instances_by_doc, responses):
        for instance, value in zip(instances, values):
            instance.resps = [value]
    instances = [inst for group in item.instances_by_doc for inst in group]
    for ensemble in getattr(task, "_filters", []):
        ensemble.apply(instances)
    raw: dict[str, list[Any]] = defaultdict(list)
    filter_keys = list(item.instances_by_doc[0][0].filtered_resps)
    for filter_key in filter_keys:
        for group in item.instances_by_doc:
            metrics = task.process_results(group[0].doc, [inst.filtered_resps[filter_key] for inst in group])
            for metric, value in metrics.items():
                raw[metric if filter_key == "none" else f"{metric},{filter_key}"].append(value)
    aggregations = task.aggregation()
    if items is not None:
        for name, values in raw.items():
            if all(isinstance(v, (bool, int, float)) for v in values):
                items[name] = [float(v) for v in values]
    return {name: float(aggregations[name.split(",")[0]](values)) for name, values in raw.items()}


@dataclass
class _Sequence:
    tokens: list[int]  # model input
    target: list[int]  # the continuation tokens, scored at the last len(target) positions


class FastScorer:
    """Pre-tokenized lm-eval requests: batched log-likelihood, and batched greedy generation with a KV
    cache for ``generate_until`` tasks (``generation.py``)."""

    def __init__(self, prepared: Sequence[PreparedTask], lm: Any, *, batch_tokens: int = 16384):
        from evomerge.eval.generation import GenerationRequest, encode_generation

        self.prepared = list(prepared)
        self.batch_tokens = batch_tokens
        self.max_length = int(lm.max_length)
        self.item_values: ItemValues = {}
        """The last ``score``'s per-item values (per selection and metric)."""
        self._decode = lm.tok_decode
        pad = lm.tokenizer.pad_token_id
        self._pad = int(pad if pad is not None else lm.eot_token_id)
        # per task, per document, per instance: the list of (input, target) windows it sums over (log-
        # likelihood tasks), or its generation request (generate_until tasks; no windows)
        self._windows: list[list[list[list[_Sequence]]]] = []
        self._generations: list[list[list[GenerationRequest]] | None] = []
        for item in self.prepared:
            if item.output_type in GENERATION_TYPES:
                self._windows.append([[[] for _ in group] for group in item.instances_by_doc])
                self._generations.append(
                    [[encode_generation(lm, inst, item.name) for inst in group] for group in item.instances_by_doc]
                )
                continue
            if item.output_type not in LOGLIKELIHOOD_TYPES:
                supported = ", ".join((*LOGLIKELIHOOD_TYPES, *GENERATION_TYPES))
                raise ValueError(
                    f"task {item.name}: output_type {item.output_type!r} is not supported by the fast backend "
                    f"(supported: {supported}); use --backend lm-eval"
                )
            self._windows.append([[self._encode(lm, inst) for inst in group] for group in item.instances_by_doc])
            self._generations.append(None)

    @property
    def windows(self) -> list[list[list[list[_Sequence]]]]:
        """Per task, per document, per instance: the token windows it is scored on (read-only)."""
        return self._windows

    def _encode(self, lm: Any, instance: Any) -> list[_Sequence]:
        """Token windows for one request, by HFLM's own rules (the same tokens lm-eval scores)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        if instance.request_type == "loglikelihood_rolling":
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=lm.tok_encode(instance.args[0]),
                    prefix_token=lm.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
        else:
            context, continuation = instance.args
            if context == "":
                cont = lm.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                ctx, cont = lm._encode_pair(context, continuation)
            windows = [(ctx, cont)]
        return [_Sequence((c + t)[-(self.max_length + 1) :][:-1], list(t)) for c, t in windows]

    def score(self, model: torch.nn.Module) -> Scores:
        """Every selection's metrics; ``item_values`` then holds each item's value of each metric."""
        from evomerge.eval.generation import greedy_generate

        flat = [seq for task in self._windows for doc in task for inst in doc for seq in inst]
        results = self._loglikelihoods(model, flat) if flat else []
        requests = [r for task in self._generations if task is not None for doc in task for r in doc]
        texts = (
            greedy_generate(model, requests, self._decode, pad_token_id=self._pad, batch_tokens=self.batch_tokens)
            if requests
            else []
        )
        scores: Scores = {}
        self.item_values = {}
        cursor = 0
        generated = iter(texts)
        for item, task_windows, generations in zip(self.prepared, self._windows, self._generations):
            responses = []
            if generations is not None:  # one text per instance, in the same order
                responses = [[next(generated) for _ in doc] for doc in generations]
                self.item_values[item.key] = {}
                scores[item.key] = aggregate(item, responses, self.item_values[item.key])
                continue
            for doc, group in zip(task_windows, item.instances_by_doc):
                doc_responses: list[Any] = []
                for inst, instance in zip(doc, group):
                    values = results[cursor : cursor + len(inst)]
                    cursor += len(inst)
                    if instance.request_type == "loglikelihood_rolling":
                        doc_responses.append(sum(v[0] for v in values))
                    else:
                        doc_responses.append(values[0])
                responses.append(doc_responses)
            self.item_values[item.key] = {}
            scores[item.key] = aggregate(item, responses, self.item_values[item.key])
        return scores

    @torch.no_grad()
    def _loglikelihoods(self, model: torch.nn.Module, sequences: list[_Sequence]) -> list[tuple[float, bool]]:
        device = next(model.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].tokens))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        start = 0
        while start < len(order):
            width = len(sequences[order[start]].tokens)
            rows = max(1, self.batch_tokens // max(width, 1))
            batch = order[start : start + rows]
            start += rows
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                tokens = sequences[index].tokens
                ids[row, : len(tokens)] = torch.tensor(tokens)
            logits = model(input_ids=ids.to(device)).logits
            # only the positions that predict continuation tokens
            rows_idx: list[int] = []
            pos_idx: list[int] = []
            targets: list[int] = []
            for row, index in enumerate(batch):
                seq = sequences[index]
                n, k = len(seq.tokens), len(seq.target)
                rows_idx.extend([row] * k)
                pos_idx.extend(range(n - k, n))
                targets.extend(seq.target)
            picked = logits[torch.tensor(rows_idx), torch.tensor(pos_idx)].float()
            if not torch.isfinite(picked).all():
                raise ScoringError("the model produced NaN or Inf logits")
            logprobs = F.log_softmax(picked, dim=-1)
            target = torch.tensor(targets, device=logprobs.device)
            token_ll = logprobs.gather(1, target[:, None]).squeeze(1).cpu()
            greedy = (logprobs.argmax(dim=-1) == target).cpu()
            offset = 0
            for index in batch:
                k = len(sequences[index].target)
                out[index] = (float(token_ll[offset : offset + k].sum()), bool(greedy[offset : offset + k].all()))
                offset += k
        return out


class LmEvalScorer:
    """lm-eval's evaluator over the in-memory model: the reference the fast backend is held to."""

    def __init__(self, prepared: Sequence[PreparedTask], tokenizer: Any, *, batch_size: int = 64):
        self.prepared = list(prepared)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._lms: dict[int, Any] = {}
        self.item_values: ItemValues = {}
        """The last ``score``'s per-item values, from lm-eval's logged samples."""

    def score(self, model: torch.nn.Module) -> Scores:
        import logging

        from lm_eval import simple_evaluate

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = self._lms.get(id(model))
        if lm is None:
            if len(self._lms) >= 2:  # the resident models (two with overlap); a mixture is a new model each time
                self._lms.pop(next(iter(self._lms)))
            lm = self._lms[id(model)] = make_hflm(model, self.tokenizer, self.batch_size)
        scores: Scores = {}
        self.item_values = {}
        # tasks sharing a name (same task, different splits) go in separate calls
        batches: dict[int, list[PreparedTask]] = defaultdict(list)
        for item in self.prepared:
            slot = sum(1 for other in batches.values() if any(o.name == item.name for o in other))
            batches[slot].append(item)
        for items in batches.values():
            result = simple_evaluate(
                model=lm,
                tasks=[i.task for i in items],
                samples={i.name: i.doc_ids for i in items},
                task_manager=items[0].manager,
                bootstrap_iters=0,
                log_samples=True,
                verbosity="ERROR",
            )
            for item in items:
                self.item_values[item.key] = _sample_values(item, result.get("samples", {}).get(item.name, []))
                values = result["results"][item.name]
                scores[item.key] = {
                    k.removesuffix(",none"): float(v)
                    for k, v in values.items()
                    if "," in k and not k.endswith("_stderr,none") and isinstance(v, (int, float)) and "stderr" not in k
                }
        for metrics in scores.values():
            for name, value in metrics.items():
                if isinstance(value, float) and math.isnan(value):
                    raise ScoringError(f"metric {name} is NaN")
        return scores


def _sample_values(item: PreparedTask, samples: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """lm-eval's logged samples (one per item and filter) -> each numeric metric's per-item values in the
    selection's order, named as the scores are (``metric``, or ``metric,filter`` for a named filter)."""
    by_filter: dict[str, dict[Any, dict[str, Any]]] = defaultdict(dict)
    for sample in samples:
        by_filter[str(sample.get("filter", "none"))][sample.get("doc_id")] = sample
    out: dict[str, list[float]] = {}
    for filter_key, by_doc in by_filter.items():
        if sorted(by_doc, key=str) != sorted(item.doc_ids, key=str):
            continue
        ordered = [by_doc[doc_id] for doc_id in item.doc_ids]
        for metric in item.metrics:
            values = [sample.get(metric) for sample in ordered]
            if all(isinstance(v, (bool, int, float)) for v in values):
                name = metric if filter_key == "none" else f"{metric},{filter_key}"
                out[name] = [float(v) for v in values]  # type: ignore[arg-type]  # checked just above
    return out

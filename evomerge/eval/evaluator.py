"""CandidateEvaluator: the object a worker owns. Recipe in, scores out, nothing on disk.

It opens the source checkpoints once (memory-mapped), keeps one resident model per layer count (a
routing may have more or fewer layers than the sources), builds the tasks and their tokenized requests
once, and for each recipe writes the merged tensors into the resident model in place and scores it.
Identical recipes (same content hash) are scored once. A candidate that raises, or produces NaN/Inf
weights or logits, comes back as a failed result with its reason; it never raises to the caller.

With ``buffers=2`` (``runtime.overlap``) two threads may call ``evaluate`` at once: a candidate is
merged into a second resident model (on CUDA, on a stream of its own) while the other is scored. The
two stages each hold a lock (merging, scoring), so at most one candidate is in each; a second buffer
is made only when the memory check says it fits, else the merge waits for the first one to be free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge.eval.result import FIDELITIES, CandidateResult, Fidelity
from evomerge.eval.scorer import FastScorer, LmEvalScorer, Scores, make_hflm
from evomerge.eval.tasks import Objective, PreparedTask, prepare_tasks, screened
from evomerge.merge.engine import materialize_into
from evomerge.merge.io import Checkpoint
from evomerge.merge.methods import get_method
from evomerge.merge.moe import model_path
from evomerge.merge.plan import MergePlan, PlanError, build_plan, open_checkpoints
from evomerge.merge.statistics import StatisticsFile
from evomerge.recipe import MoEConfig, Recipe

Backend = Literal["fast", "lm-eval"]


SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESIDENT_SOURCES = ("auto", "on", "off")
"""``runtime.resident_sources``: keep the sources' tensors on the scoring device between candidates
(``merge/resident.py``): ``auto`` on CUDA when they fit, ``on`` wherever they fit, ``off``."""
OVERLAP_SHARE = 0.5
"""A second resident model (``buffers=2``) is made on a GPU only if it takes at most this share of the
device's free memory (the rest is for activations while the other one is scored)."""
log = logging.getLogger(__name__)


def resolve_score_dtype(score_dtype: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (half the memory and bandwidth, full range), float32 on CPU (where
    bfloat16 matmuls are slow and the zoo's scores are exact in float32)."""
    if score_dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"runtime.score_dtype: {score_dtype!r} is not valid; use auto, {', '.join(SCORE_DTYPES)}")
    return SCORE_DTYPES[score_dtype]


def resolve_device(device: str | None) -> str:
    """``None``/``auto``: CUDA when a GPU is present, else CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N")
    return device


class CandidateEvaluator:
    """Scores recipes (or saved checkpoints) on objectives, reusing everything between candidates."""

    def __init__(
        self,
        objectives: Sequence[Objective],
        *,
        include_paths: Sequence[str | Path] = (),
        backend: Backend = "fast",
        device: str | None = None,
        score_dtype: str = "auto",
        seed: int = 0,
        base_dir: Path | None = None,
        allow_pickle: bool = False,
        batch_tokens: int = 16384,
        resident_sources: str = "auto",
        buffers: int = 1,
    ):
        if not objectives:
            raise ValueError("objectives: at least one objective is needed")
        if backend not in ("fast", "lm-eval"):
            raise ValueError(f"backend {backend!r}: expected fast or lm-eval")
        if resident_sources not in RESIDENT_SOURCES:
            raise ValueError(
                f"runtime.resident_sources: {resident_sources!r} is not valid; use {', '.join(RESIDENT_SOURCES)}"
            )
        if buffers not in (1, 2):
            raise ValueError(f"buffers: {buffers} is not valid; use 1 (one candidate at a time) or 2 (overlap)")
        self.backend = backend
        self.buffers = buffers
        """Resident models per layer count: 2 lets one candidate merge while another is scored."""
        self.resident_sources = resident_sources
        self._resident: Any = None  # ResidentSources, made by the first candidate that uses them
        self.resident_note: str | None = None
        """Why the sources are not resident (the memory check's verdict), when they are not."""
        self.device = resolve_device(device)
        self.score_dtype = resolve_score_dtype(score_dtype, self.device)
        self.seed = seed
        self.base_dir = base_dir
        self.allow_pickle = allow_pickle
        self.batch_tokens = batch_tokens
        self.prepared: list[PreparedTask]
        self.objectives: list[Objective]
        self.prepared, self.objectives = prepare_tasks(objectives, include_paths)
        self._checkpoints: dict[str, Checkpoint] = {}
        self._statistics_files: dict[tuple[str, str, str], StatisticsFile] = {}
        """(statistic, model reference, data section) -> that model's statistics file."""
        self._models: dict[int, list[torch.nn.Module]] = {}
        """Per layer count, every resident model made so far (at most ``buffers``)."""
        self._free: dict[int, list[torch.nn.Module]] = {}
        """Per layer count, the resident models no candidate is using now."""
        self._buffers_free = threading.Condition()
        self._merge_lock = threading.Lock()
        self._score_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._merge_stream: Any = None  # a CUDA stream for merging while another candidate is scored
        self.buffer_note: str | None = None
        """Why a second resident model was not made (the memory check's verdict), when it was not."""
        self._tokenizer: Any = None
        self._scorers: dict[Fidelity, FastScorer | LmEvalScorer] = {}
        self._cache: dict[tuple[str, Fidelity], CandidateResult] = {}

    # --- public ------------------------------------------------------------------------------------
    def evaluate(self, recipe: Recipe | MoEConfig, fidelity: Fidelity = "full") -> CandidateResult:
        """Merge ``recipe`` into the resident model and score it on every configured item (``full``) or
        on the screened subsets (``screen``, see ``Objective.screen``); failures are results, not exceptions.
        A mixture of experts (``MoEConfig``) is assembled as a model of its own for each candidate."""
        if fidelity not in FIDELITIES:
            raise ValueError(f"fidelity {fidelity!r}: expected one of {', '.join(FIDELITIES)}")
        key = recipe.content_hash()
        with self._cache_lock:
            if (key, fidelity) in self._cache:
                return dataclasses.replace(self._cache[key, fidelity], cached=True, seconds=0.0)
        start = time.perf_counter()
        model = None
        plan: MergePlan | None = None
        try:
            with self._merge_lock:  # one candidate merges at a time (sources, caches, the merge stream)
                if isinstance(recipe, MoEConfig):
                    model, tokenizer_dir = self._moe_model(recipe), model_path(recipe.base_model, self.base_dir)
                else:
                    plan = self._plan(recipe)
                    model = self._take_model(plan)
                    with self._merging():
                        materialize_into(model, plan, seed=self.seed, source=self._source(plan))
                    tokenizer_dir = self._tokenizer_dir(plan)
                    if plan.tokenizer is not None and self._tokenizer is None:  # aligned vocabularies
                        self._tokenizer = plan.tokenizer
                _check_finite(model)
            merged = time.perf_counter()
            with self._score_lock:  # one candidate scores at a time (the scorers keep per-item values)
                scores = self._score(model, tokenizer_dir, fidelity)
                result = self._result(key, scores, fidelity)
            result.materialize_seconds = merged - start
            result.score_seconds = time.perf_counter() - merged
        except Exception as exc:  # a bad candidate must not take the search down
            result = CandidateResult(key, "failed", reason=f"{type(exc).__name__}: {exc}", fidelity=fidelity)
        finally:
            if model is not None and plan is not None:
                self._give_back(plan.num_layers, model)
        result.seconds = time.perf_counter() - start
        with self._cache_lock:
            self._cache[key, fidelity] = result
        return result

    def selections(self, fidelity: Fidelity = "full") -> list[PreparedTask]:
        """The item selections scored at ``fidelity``: all of them, or each screened objective's subset."""
        if fidelity == "full":
            return self.prepared
        sizes = {o.label: o.screen for o in self.objectives if o.screen}
        out = []
        for item in self.prepared:
            screens = [sizes[label] for label in item.objective_labels if label in sizes]
            out.append(screened(item, min(screens)) if screens else item)
        return out

    def evaluate_checkpoint(self, path: str | Path) -> CandidateResult:
        """Score a saved checkpoint directory as it is (no merge)."""
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        path = Path(path)
        Checkpoint(path, allow_pickle=self.allow_pickle)  # clear errors for non-checkpoints, pickle refusal
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.score_dtype).to(self.device).eval()  # type: ignore[arg-type]  # transformers' typed .to wrapper
        loaded = time.perf_counter()
        result = self._result(str(path), self._score(model, path, "full"), "full")
        result.materialize_seconds = loaded - start
        result.score_seconds = time.perf_counter() - loaded
        result.seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        for ckpt in self._checkpoints.values():
            ckpt.close()
        self._checkpoints.clear()
        self._models.clear()
        self._free.clear()

    # --- internals ---------------------------------------------------------------------------------
    def _plan(self, recipe: Recipe) -> MergePlan:
        checkpoints = open_checkpoints(
            recipe, base_dir=self.base_dir, allow_pickle=self.allow_pickle, cache=self._checkpoints
        )
        self._checkpoints.update(checkpoints)
        return build_plan(recipe, checkpoints, self._statistics(recipe), base_dir=self.base_dir)

    def _statistics(self, recipe: Recipe) -> dict[str, StatisticsFile] | None:
        """A data-aware recipe's statistics files: looked up (disk cache) or computed once per worker and
        data section, so later candidates neither fingerprint files nor reopen them."""
        statistic = get_method(recipe.merge_method).statistic
        if statistic is None or recipe.data is None:
            return None
        data = recipe.data.model_dump_json()
        keys = {model: (str(statistic), model, data) for model in recipe.referenced_models()}
        if any(key not in self._statistics_files for key in keys.values()):
            from evomerge.eval.statistics import statistics_provider

            provide = statistics_provider(base_dir=self.base_dir, device=self.device, batch_tokens=self.batch_tokens)
            for model, path in provide(recipe).items():
                self._statistics_files[keys[model]] = StatisticsFile(path)
        return {model: self._statistics_files[key] for model, key in keys.items()}

    def _source(self, plan: MergePlan) -> Any:
        """Where the merge reads source tensors: device-resident copies (``merge/resident.py``) when
        ``resident_sources`` is on, or auto on CUDA, and they fit; else None (the checkpoints)."""
        if self.resident_sources == "off" or (self.resident_sources == "auto" and not self.device.startswith("cuda")):
            return None
        if self._resident is None:
            from evomerge.merge.resident import ResidentSources

            self._resident = ResidentSources(self.device)
        if self._resident.admit(plan):
            self.resident_note = None
            return self._resident
        if self.resident_note != self._resident.refused:
            log.warning("resident sources: %s", self._resident.refused)
            self.resident_note = self._resident.refused
        return None

    def _moe_model(self, config: MoEConfig) -> torch.nn.Module:
        """A mixture's own model (its shape depends on its experts, so it is built per candidate)."""
        from evomerge.merge.moe import moe_model

        return moe_model(config, base_dir=self.base_dir, device=self.device, dtype=self.score_dtype, seed=self.seed)

    def _take_model(self, plan: MergePlan) -> torch.nn.Module:
        """A resident model of the plan's layer count that no other candidate is using: a free one, a new
        one (the first, or a second when ``buffers=2`` and it fits), or else the next one given back."""
        layers = plan.num_layers
        with self._buffers_free:
            while True:
                free = self._free.setdefault(layers, [])
                if free:
                    return free.pop()
                made = self._models.setdefault(layers, [])
                if not made or (len(made) < self.buffers and self._second_fits(made[0])):
                    break
                self._buffers_free.wait()
        model = self._new_model(plan)
        with self._buffers_free:
            self._models[layers].append(model)
        return model

    def _give_back(self, layers: int, model: torch.nn.Module) -> None:
        with self._buffers_free:
            self._free.setdefault(layers, []).append(model)
            self._buffers_free.notify_all()

    def _second_fits(self, model: torch.nn.Module) -> bool:
        """The memory check for a second resident model: on a GPU it must take at most
        ``OVERLAP_SHARE`` of the free memory; on a CPU, of the free physical memory."""
        from evomerge.merge.resident import free_bytes

        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free = free_bytes(torch.device(self.device))
        if need <= OVERLAP_SHARE * free:
            self.buffer_note = None
            return True
        note = (
            f"a second resident model ({need / 2**30:.2f} GiB) does not fit in {OVERLAP_SHARE:.0%} of the "
            f"{free / 2**30:.2f} GiB free on {self.device}; candidates are merged and scored one at a time"
        )
        if note != self.buffer_note:
            log.warning("overlap: %s", note)
            self.buffer_note = note
        return False

    def _new_model(self, plan: MergePlan) -> torch.nn.Module:
        """A resident model built from the plan's output config (then reused for every candidate)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**{k: v for k, v in plan.config.items() if k != "dtype"})
        model = AutoModelForCausalLM.from_config(config, dtype=self.score_dtype).to(self.device).eval()
        names = {job.name for job in plan.jobs}
        uncovered = [n for n, _ in model.named_parameters() if n not in names]
        if uncovered:
            raise PlanError(f"the merge does not produce {uncovered[0]} of the model ({len(uncovered)} missing)")
        return model

    @contextlib.contextmanager
    def _merging(self) -> Iterator[None]:
        """With two buffers on CUDA, merge on a stream of its own (so the copies and merge kernels run
        beside the other candidate's scoring) and wait for it before the candidate is scored."""
        if self.buffers < 2 or not self.device.startswith("cuda"):
            yield
            return
        if self._merge_stream is None:
            self._merge_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._merge_stream):
            yield
        self._merge_stream.synchronize()

    def _tokenizer_dir(self, plan: MergePlan) -> Path:
        ckpt = plan.checkpoints.get(plan.tokenizer_model)
        return ckpt.path if ckpt is not None else Path(plan.tokenizer_model)

    def _score(self, model: torch.nn.Module, tokenizer_dir: Path, fidelity: Fidelity) -> Scores:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        scorer = self._scorers.get(fidelity)
        if scorer is None:
            if self.backend == "fast":
                lm = make_hflm(model, self._tokenizer)
                scorer = FastScorer(self.selections(fidelity), lm, batch_tokens=self.batch_tokens)
            else:
                scorer = LmEvalScorer(self.selections(fidelity), self._tokenizer)
            self._scorers[fidelity] = scorer
        return scorer.score(model)

    def _result(self, key: str, scores: Scores, fidelity: Fidelity) -> CandidateResult:
        selections = self.selections(fidelity)
        metrics = {f"{item.name}@{item.split}": scores[item.key] for item in selections}
        by_label = {o.label: o for o in self.objectives}
        values = {
            label: scores[item.key][str(by_label[label].metric)]
            for item in selections
            for label in item.objective_labels
        }
        per_item = self._scorers[fidelity].item_values
        items = {
            label: per_item[item.key][str(by_label[label].metric)]
            for item in selections
            for label in item.objective_labels
            if str(by_label[label].metric) in per_item.get(item.key, {})
        }
        return CandidateResult(key, "ok", objectives=values, metrics=metrics, items=items, fidelity=fidelity)


def _check_finite(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise FloatingPointError(f"merged weights contain NaN or Inf ({name})")

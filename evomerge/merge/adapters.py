"""PEFT LoRA adapters: as sources (the base with the adapter merged in) and merged with each other.

- ``LoraAdapter`` reads an adapter directory: its config through ``peft.LoraConfig``, its weights from
  safetensors (never pickle). Per adapted module it holds ``A`` (r x in), ``B`` (out x r) and PEFT's
  scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA); ``delta(module)`` is what PEFT's
  ``merge_and_unload`` adds to the module's weight.
- ``AdapterCheckpoint`` is a ``Checkpoint`` of ``BASE+ADAPTER`` (mergekit's reference syntax): the
  base's tensors, with the adapter's delta added to each adapted weight. Every merge method, the plan,
  the search and the gradient fit read it like any checkpoint.
- ``merge_adapters`` combines adapters into one, as PEFT's ``add_weighted_adapter`` does (same
  combination types and parameters, same result; tests hold it to PEFT's), and ``save_adapter`` writes
  a directory ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.atomic import staging_dir
from evomerge.merge.io import Checkpoint, CheckpointError
from evomerge.recipe.adapters import SAME_RANK, AdapterMerge

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta = B @ A * scaling`` (transposed for embeddings and fan_in_fan_out)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False
    """An embedding's LoRA (A is r x num_embeddings): the delta is (B @ A)^T."""
    fan_in_fan_out: bool = False
    """A Conv1D-style weight (in x out): the delta is (B @ A)^T."""

    @property
    def transposed(self) -> bool:
        return self.embedding or self.fan_in_fan_out

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The adapted weight's shape (what ``delta()`` returns), without computing the delta."""
        rows, cols = int(self.B.shape[0]), int(self.A.shape[1])
        return (cols, rows) if self.transposed else (rows, cols)

    def delta(self) -> torch.Tensor:
        product = self.B @ self.A
        return (product.T if self.transposed else product) * self.scaling


class LoraAdapter:
    """A PEFT LoRA adapter directory: config and per-module factors."""

    def __init__(self, path: str | Path):
        from peft import LoraConfig
        from safetensors.torch import load_file

        self.path = Path(path)
        if not (self.path / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{self.path}: no {ADAPTER_CONFIG}, so not a PEFT adapter directory")
        if not (self.path / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"{self.path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
        raw = json.loads((self.path / ADAPTER_CONFIG).read_text())
        if raw.get("peft_type") != "LORA":
            raise CheckpointError(f"{self.path}: peft_type {raw.get('peft_type')!r}; only LORA adapters are supported")
        self.config = LoraConfig.from_pretrained(str(self.path))
        unsupported = {
            "use_dora": bool(self.config.use_dora),
            "rank_pattern": bool(self.config.rank_pattern),
            "alpha_pattern": bool(self.config.alpha_pattern),
            "modules_to_save": bool(self.config.modules_to_save),
            "target_parameters": bool(getattr(self.config, "target_parameters", None)),
        }
        used = [key for key, on in unsupported.items() if on]
        if used:
            raise CheckpointError(
                f"{self.path}: {', '.join(used)} in {ADAPTER_CONFIG} is not supported (plain LoRA is)"
            )
        r, alpha = int(self.config.r), float(self.config.lora_alpha)
        self.scaling = alpha / math.sqrt(r) if self.config.use_rslora else alpha / r
        parts: dict[str, dict[str, torch.Tensor]] = {}
        self.saved_layers: dict[str, torch.Tensor] = {}
        """Whole base-layer weights saved with the adapter (PEFT does so for adapted embeddings,
        ``save_embedding_layers``); loading the adapter puts them in place of the base's."""
        for key, tensor in load_file(str(self.path / ADAPTER_WEIGHTS)).items():
            if key.endswith(".base_layer.weight"):
                self.saved_layers[key.removeprefix(PREFIX).replace(".base_layer.weight", ".weight")] = tensor
                continue
            match = _KEY.match(key.removeprefix(PREFIX))
            if match is None:
                raise CheckpointError(f"{self.path}: tensor {key} is not a LoRA factor (lora_A / lora_B)")
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        self.modules: dict[str, LoraModule] = {}
        for module, found in parts.items():
            embedding = "lora_embedding_A" in found
            a = found.get("lora_embedding_A" if embedding else "lora_A")
            b = found.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise CheckpointError(f"{self.path}: module {module} has only one of its two LoRA factors")
            self.modules[module] = LoraModule(a, b, self.scaling, embedding, bool(self.config.fan_in_fan_out))
        if not self.modules:
            raise CheckpointError(f"{self.path}: {ADAPTER_WEIGHTS} holds no LoRA factors")

    @property
    def rank(self) -> int:
        return int(self.config.r)


class AdapterCheckpoint(Checkpoint):
    """``BASE+ADAPTER``: the base checkpoint's tensors with the adapter's deltas added (as PEFT's
    ``merge_and_unload`` computes them, in float32, cast back to the stored dtype)."""

    def __init__(self, base: str | Path, adapter: str | Path, *, allow_pickle: bool = False):
        super().__init__(base, allow_pickle=allow_pickle)
        self.adapter = LoraAdapter(adapter)
        self.deltas = {f"{module}.weight": lora for module, lora in self.adapter.modules.items()}
        for name, lora in self.deltas.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.adapter.path}: adapts {name}, which {self.path} does not have")
            if lora.shape != info.shape:
                raise CheckpointError(
                    f"{self.adapter.path}: its delta for {name} is {list(lora.shape)}, "
                    f"the base's weight {list(info.shape)} (an adapter of another model?)"
                )

    def get(self, name: str) -> torch.Tensor:
        saved = self.adapter.saved_layers.get(name)
        tensor = super().get(name) if saved is None else saved.to(self.tensors[name].dtype)
        lora = self.deltas.get(name)
        if lora is None:
            return tensor
        return (tensor.to(torch.float32) + lora.delta().to(torch.float32)).to(tensor.dtype)

    def stored(self, name: str) -> bool:
        return name not in self.deltas and name not in self.adapter.saved_layers

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r} + {str(self.adapter.path)!r})"


# --- adapter-space merging ------------------------------------------------------------------------


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().flatten(), k=keep, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float | None,
    sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One of PEFT's weighted combinations of task tensors (``linear`` = task arithmetic, ``ties``,
    ``dare_linear``, ``dare_ties``, ``magnitude_prune``; the ``*_svd`` names without the suffix).

    As PEFT does (and unlike mergekit's TIES): entries are pruned per tensor, the sign is elected on the
    pruned, *unweighted* tensors, and agreeing weighted entries are averaged by their count."""
    name = method.removesuffix("_svd")
    if name == "svd":
        name = "linear"
    d = 1.0 if density is None else float(density)
    if name in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, d) for t in tensors]
    elif name in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, d, generator) for t in tensors]
    elif name != "linear":
        raise ValueError(f"unknown combination {method!r}")
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if name in ("ties", "dare_ties"):
        signs = stacked.sign()
        votes = stacked.sum(0) if sign_method == "total" else signs.sum(0)
        agree = signs == torch.where(votes >= 0, 1, -1)
        return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (stacked * w).sum(0)


def merge_adapters(
    spec: AdapterMerge, adapters: Sequence[LoraAdapter], module_order: Sequence[str], *, seed: int = 0
) -> tuple[dict[str, LoraModule], int]:
    """The merged adapter's factors per module, and its rank (its scaling is 1: ``lora_alpha = r``).

    ``module_order`` lists the base model's modules in its ``named_modules`` order: PEFT merges modules in
    that order, which decides the random draws of the dare variants. Here they come from a generator
    seeded by ``seed`` (the same adapter every time); PEFT draws from torch's global generator, after
    initializing the new adapter's factors, so its dare results equal these when its ``torch.bernoulli``
    draws from a generator seeded the same way (the test does that), not after ``torch.manual_seed``."""
    combination = spec.combination
    weights = [a.weight for a in spec.adapters]
    ranks = [a.rank for a in adapters]
    if combination in SAME_RANK and len(set(ranks)) > 1:
        raise ValueError(f"adapter_merge {combination}: every adapter needs the same rank r, got {ranks}")
    rank = (
        sum(ranks)
        if combination == "cat"
        else (spec.svd_rank or max(ranks))
        if combination.endswith("svd")
        else ranks[0]
    )
    generator = torch.Generator().manual_seed(seed)
    adapted = set().union(*(a.modules for a in adapters))
    unknown = adapted - set(module_order)
    if unknown:
        raise ValueError(f"adapters adapt {sorted(unknown)[0]}, which the base model {spec.base_model} does not have")
    merged: dict[str, LoraModule] = {}
    for module in (m for m in module_order if m in adapted):
        present = [(a.modules[module], w) for a, w in zip(adapters, weights) if module in a.modules]
        first = present[0][0]
        if combination == "cat":
            A = torch.cat([lora.A * w * lora.scaling for lora, w in present], dim=0)
            B = torch.cat([lora.B for lora, _ in present], dim=1)
            pad = rank - A.shape[0]
            if pad:  # a module some adapters do not adapt: PEFT leaves their rows zero
                A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
                B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        elif combination.endswith("svd"):
            delta = combine(
                [lora.delta() for lora, _ in present],
                [w for _, w in present],
                combination,
                spec.density,
                spec.majority_sign_method,
                generator,
            )
            if first.transposed:
                delta = delta.T
            U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
            B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
            if spec.svd_clamp is not None:
                high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), spec.svd_clamp)
                B, A = B.clamp(-high, high), A.clamp(-high, high)
        else:
            signed = [w * lora.scaling for lora, w in present]
            a_weights = [math.copysign(math.sqrt(abs(s)), s) for s in signed]
            b_weights = [math.sqrt(abs(s)) for s in signed]
            A = combine(
                [lora.A for lora, _ in present],
                a_weights,
                combination,
                spec.density,
                spec.majority_sign_method,
                generator,
            )
            B = combine(
                [lora.B for lora, _ in present],
                b_weights,
                combination,
                spec.density,
                spec.majority_sign_method,
                generator,
            )
        merged[module] = LoraModule(A.contiguous(), B.contiguous(), 1.0, first.embedding, first.fan_in_fan_out)
    return merged, rank


def module_order(base_dir: str | Path) -> list[str]:
    """The base model's module names in ``named_modules`` order (a model built on the meta device: no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def save_adapter(
    out_dir: str | Path, spec: AdapterMerge, adapters: Sequence[LoraAdapter], merged: dict[str, LoraModule], rank: int
) -> Path:
    """Write the merged adapter as PEFT writes one (config: the first adapter's with ``r = lora_alpha =
    rank`` and the union of target modules), atomically."""
    from safetensors.torch import save_file

    config = json.loads((adapters[0].path / ADAPTER_CONFIG).read_text())
    targets: Any = [a.config.target_modules for a in adapters]
    if all(isinstance(t, str) for t in targets):
        union: Any = "|".join(f"({t})" for t in targets) if len(targets) > 1 else targets[0]
    else:
        union = sorted(set().union(*(set(t) for t in targets)))
    config.update(
        r=rank,
        lora_alpha=rank,
        target_modules=union,
        alpha_pattern={},
        rank_pattern={},
        base_model_name_or_path=str(spec.base_model),
    )
    tensors: dict[str, torch.Tensor] = {}
    for module, lora in merged.items():
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if lora.embedding else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{module}.{a_key}"] = lora.A
        tensors[f"{PREFIX}{module}.{b_key}"] = lora.B
    with staging_dir(out_dir) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "evomerge_adapter_merge.yaml").write_text(spec.to_yaml())
    return Path(out_dir)


def merge_adapters_to_disk(
    spec: AdapterMerge, out_dir: str | Path, *, base_dir: Path | None = None, seed: int = 0
) -> Path:
    """``evomerge merge`` of an ``adapter_merge:`` file: the merged PEFT adapter in ``out_dir``."""

    def resolve(ref: str) -> Path:
        path = Path(ref)
        return path if path.is_absolute() or base_dir is None else base_dir / path

    adapters = [LoraAdapter(resolve(a.adapter)) for a in spec.adapters]
    merged, rank = merge_adapters(spec, adapters, module_order(resolve(spec.base_model)), seed=seed)
    return save_adapter(out_dir, spec, adapters, merged, rank)

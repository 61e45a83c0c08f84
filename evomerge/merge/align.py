"""Permutation alignment of two Llama models (Git Re-Basin's weight matching, Ainsworth et al. 2023).

Models trained from different initializations compute the same kind of function with their units in
different orders, so averaging their weights averages unrelated units. A transformer block has three
kinds of interchangeable units, and permuting any of them leaves the model's function unchanged:

- the residual stream's channels (one permutation for the whole model: embeddings, every block's
  input and output projections, the RMSNorm weights, which are per channel, and the LM head);
- each block's MLP neurons (rows of gate/up, columns of down);
- each block's attention heads, moved as whole key/value groups with their query heads (whole heads
  keep RoPE's pairing of dimensions, so the permutation is exact).

``weight_matching`` finds the permutations that make model B's weights most similar to model A's: for
one permutation at a time, the sum over every tensor it touches of <A, permuted B> is a linear
assignment problem (``scipy.optimize.linear_sum_assignment``); passes over the permutations in a seeded
random order repeat until none improves. ``permute`` applies them; the permuted model's outputs equal
the original's up to float summation order (a test holds them within 1e-5).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Perms = dict[str, torch.Tensor]
"""Permutation name (``residual``, ``mlp.<layer>``, ``heads.<layer>``) -> index tensor: unit i of the
permuted model is unit ``perm[i]`` of the original."""


class AlignError(ValueError):
    """Two models that cannot be aligned (another architecture, other shapes); names what differs."""


@dataclass(frozen=True)
class LlamaShape:
    """What the permutations need to know of a Llama config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping) -> LlamaShape:
        if config.get("model_type") not in ("llama", "mistral", "qwen2"):
            raise AlignError(
                f"model_type {config.get('model_type')!r}: align handles Llama-style models (llama, mistral, qwen2)"
            )
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
        )

    def sizes(self) -> dict[str, int]:
        """Each permutation's number of units."""
        out = {"residual": self.hidden}
        for layer in range(self.layers):
            out[f"mlp.{layer}"] = self.intermediate
            out[f"heads.{layer}"] = self.kv_heads
        return out


def axes(name: str, shape: LlamaShape) -> list[str | None]:
    """Per axis of tensor ``name``, the permutation acting on it (None: none)."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return [None, "residual"]
    if name == "model.norm.weight":
        return ["residual"]
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        raise AlignError(f"{name}: not a Llama tensor align knows")
    layer, rest = parts[2], ".".join(parts[3:])
    heads, mlp = f"heads.{layer}", f"mlp.{layer}"
    table: dict[str, list[str | None]] = {
        "input_layernorm.weight": ["residual"],
        "post_attention_layernorm.weight": ["residual"],
        "self_attn.q_proj.weight": [heads, "residual"],
        "self_attn.k_proj.weight": [heads, "residual"],
        "self_attn.v_proj.weight": [heads, "residual"],
        "self_attn.o_proj.weight": ["residual", heads],
        "self_attn.q_proj.bias": [heads],
        "self_attn.k_proj.bias": [heads],
        "self_attn.v_proj.bias": [heads],
        "self_attn.o_proj.bias": ["residual"],
        "mlp.gate_proj.weight": [mlp, "residual"],
        "mlp.up_proj.weight": [mlp, "residual"],
        "mlp.down_proj.weight": ["residual", mlp],
        "mlp.gate_proj.bias": [mlp],
        "mlp.up_proj.bias": [mlp],
        "mlp.down_proj.bias": ["residual"],
    }
    if rest not in table:
        raise AlignError(f"{name}: not a Llama tensor align knows")
    return table[rest]


def _indices(key: str, perm: torch.Tensor, length: int) -> torch.Tensor:
    """A unit permutation expanded to the axis' indices: heads are blocks of rows (a key/value group and
    its query heads), every other unit is one index."""
    units = perm.numel()
    if length == units:
        return perm
    block = length // units  # rows per head group on this axis (q: n_rep * head_dim; k, v: head_dim)
    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def permute_tensor(
    name: str, tensor: torch.Tensor, perms: Perms, shape: LlamaShape, skip: str | None = None
) -> torch.Tensor:
    """``tensor`` with every permutation in ``perms`` applied to its axes (but ``skip``)."""
    out = tensor
    for axis, key in enumerate(axes(name, shape)):
        if key is None or key == skip or key not in perms:
            continue
        out = out.index_select(axis, _indices(key, perms[key], out.shape[axis]))
    return out


def permute(state: Mapping[str, torch.Tensor], perms: Perms, shape: LlamaShape) -> dict[str, torch.Tensor]:
    """A model's weights with its units permuted (the same function, up to float summation order)."""
    return {name: permute_tensor(name, tensor, perms, shape) for name, tensor in state.items()}


def identity(shape: LlamaShape) -> Perms:
    return {key: torch.arange(size) for key, size in shape.sizes().items()}


def _similarity(
    key: str,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    perms: Perms,
    shape: LlamaShape,
    units: int,
) -> torch.Tensor:
    """S[i, j] = sum over the tensors ``key`` acts on of <reference's unit i, other's unit j> (other's
    remaining axes permuted as ``perms`` says)."""
    total = torch.zeros((units, units), dtype=torch.float64)
    for name, a in reference.items():
        tensor_axes = axes(name, shape)
        if key not in tensor_axes:
            continue
        axis = tensor_axes.index(key)
        b = permute_tensor(name, other[name], perms, shape, skip=key)
        a_units = a.movedim(axis, 0).reshape(units, -1).double()
        b_units = b.movedim(axis, 0).reshape(units, -1).double()
        total += a_units @ b_units.T
    return total


def check_same_layout(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], shape: LlamaShape
) -> None:
    """Refuse two models whose tensors differ in names or shapes, or that have tensors align does not know."""
    if set(reference) != set(other):
        missing = sorted(set(reference) ^ set(other))
        raise AlignError(f"the two models have different tensors (e.g. {missing[0]})")
    for name, a in reference.items():
        if a.shape != other[name].shape:
            raise AlignError(f"{name}: shapes differ ({list(a.shape)} vs {list(other[name].shape)})")
        axes(name, shape)


def weight_matching(
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    *,
    max_passes: int = 100,
    seed: int = 0,
) -> Perms:
    """The permutations of ``other``'s units that maximize its weights' inner product with
    ``reference``'s (coordinate ascent over the permutations, one assignment problem each)."""
    check_same_layout(reference, other, shape)
    perms = identity(shape)
    sizes = shape.sizes()
    order = list(sizes)
    rng = random.Random(seed)
    for _ in range(max_passes):
        improved = False
        rng.shuffle(order)
        for key in order:
            similarity = _similarity(key, reference, other, perms, shape, sizes[key])
            new = _assignment(similarity)
            before = similarity[torch.arange(sizes[key]), perms[key]].sum()
            after = similarity[torch.arange(sizes[key]), new].sum()
            if after > before + 1e-12 * abs(float(before)):
                perms[key] = new
                improved = True
        if not improved:
            break
    return perms


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every column of ``a`` (samples x units) with every column of ``b``."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return a.T @ b


def _assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation maximizing the summed similarity: unit i of the permuted model is unit perm[i]."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]


def _activations(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], shape: LlamaShape
) -> dict[str, torch.Tensor]:
    """Per unit kind, the model's activations on every real (unpadded) token: the residual stream after
    the embeddings and after each block (all concatenated), each block's MLP neurons (down_proj's input)
    and attention outputs per head (o_proj's input)."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    layers: Any = model.model.layers  # type: ignore[union-attr]  # a Llama: model.model.layers
    for layer, block in enumerate(layers):
        for key, module in ((f"mlp.{layer}", block.mlp.down_proj), (f"heads.{layer}", block.self_attn.o_proj)):
            hooks.append(
                module.register_forward_pre_hook(lambda _m, args, key=key: captured.setdefault(key, []).append(args[0]))
            )
    residual: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for ids, mask in batches:
                before = {k: len(v) for k, v in captured.items()}
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                keep = mask.bool()
                residual.append(torch.cat([h[keep] for h in out.hidden_states], dim=0))
                for key, values in captured.items():
                    values[before.get(key, 0)] = values[before.get(key, 0)][keep]
    finally:
        for hook in hooks:
            hook.remove()
    out_: dict[str, torch.Tensor] = {"residual": torch.cat(residual)}
    out_.update({key: torch.cat(values) for key, values in captured.items()})
    return out_


def padded_batches(
    input_ids: list[list[int]], pad_token_id: int, size: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches of ``size`` sequences, right-padded to the longest."""
    width = max(len(x) for x in input_ids)
    batches = []
    for start in range(0, len(input_ids), size):
        chunk = input_ids[start : start + size]
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        batches.append((ids, mask))
    return batches


def activation_matching(
    reference: torch.nn.Module,
    other: torch.nn.Module,
    input_ids: list[list[int]],
    shape: LlamaShape,
    *,
    pad_token_id: int = 0,
) -> Perms:
    """The permutations of ``other``'s units whose activations correlate best with ``reference``'s on the
    same inputs (Ainsworth et al.'s activation matching): the residual channels over every layer's
    output, each block's MLP neurons, and its head groups by how well their output subspaces match
    (the nuclear norm of the groups' cross-correlation: a head's output dimensions need not be in
    the same order in the two models)."""
    batches = padded_batches(input_ids, pad_token_id)
    a, b = _activations(reference, batches, shape), _activations(other, batches, shape)
    perms: Perms = {}
    for key in shape.sizes():
        if key.startswith("heads."):
            groups = shape.kv_heads
            x, y = a[key].reshape(len(a[key]), groups, -1), b[key].reshape(len(b[key]), groups, -1)
            similarity = torch.zeros((groups, groups), dtype=torch.float64)
            for g in range(groups):
                for h in range(groups):
                    similarity[g, h] = torch.linalg.matrix_norm(_correlation(x[:, g], y[:, h]), ord="nuc")
        else:
            similarity = _correlation(a[key], b[key])
        perms[key] = _assignment(similarity)
    return perms


def _match_activations(
    reference: Path,
    model: Path,
    data: list[str],
    shape: LlamaShape,
    *,
    rotate: bool,
    fit_steps: int,
    seed: int,
    progress: bool,
) -> tuple[Perms, Any]:
    """Activation matching of two checkpoints on ``data`` (tokenized by the reference's tokenizer); with
    ``rotate``, the rotations too (``rotation.rotation_alignment``, then ``fit_steps`` of
    ``rotation.fit_rotations`` on the same texts), else None for them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in data]
    if not any(ids):
        raise AlignError("--data: no text to compute activations on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (reference, model)]
    ids = [x for x in ids if x]
    if not rotate:
        return activation_matching(models[0], models[1], ids, shape, pad_token_id=pad), None
    from evomerge.merge.rotation import fit_rotations, rotation_alignment

    perms, rotations = rotation_alignment(models[0], models[1], ids, shape, pad_token_id=pad)
    if fit_steps > 0:
        norms = {k: v for k, v in models[0].state_dict().items() if k.endswith("norm.weight")}
        permuted = permute(dict(models[1].state_dict()), perms, shape)
        rotations = fit_rotations(
            models[0],
            permuted,
            rotations,
            shape,
            ids,
            norms=norms,
            steps=fit_steps,
            seed=seed,
            pad_token_id=pad,
            progress=progress,
        )
    return perms, rotations


def _check_rotation_options(
    state: Mapping[str, torch.Tensor], config: Mapping, *, rotate: bool, data: list[str] | None, fit_steps: int
) -> None:
    if fit_steps < 0:
        raise AlignError(f"--fit-steps: {fit_steps}; give 0 (no fitting) or more")
    if not rotate:
        if fit_steps:
            raise AlignError("--fit-steps: fitting is of rotations; add --rotate")
        return
    if not data:
        raise AlignError("--rotate: rotations are found from activations; give --data")
    from evomerge.merge.rotation import check_rotatable

    check_rotatable(state, config)


def align_checkpoints(
    reference: str | Path,
    model: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    data: list[str] | None = None,
    rotate: bool = False,
    fit_steps: int = 0,
    progress: bool = False,
) -> dict:
    """Write ``model`` permuted into ``reference``'s basis to ``out_dir`` (a checkpoint like ``model``'s:
    its config and tokenizer files, one safetensors file; written beside and renamed into place), the
    permutations found by weight matching, or with ``data`` (texts) by activation matching on them;
    with ``rotate`` (needs ``data``) also the residual stream, values and RoPE planes rotated
    (``rotation``), the RMSNorm weights then the reference's, and with ``fit_steps`` the rotations
    fitted to the midpoint's loss on ``data``. Returns what was found: per permutation,
    how many units moved, and the weights' inner product with the reference before and after."""
    import shutil

    from safetensors.torch import save_file

    from evomerge.atomic import staging_dir
    from evomerge.merge.engine import TOKENIZER_FILES
    from evomerge.merge.io import Checkpoint

    ref, src = Checkpoint(reference), Checkpoint(model)
    try:
        shape = LlamaShape.from_config(src.config)
        if LlamaShape.from_config(ref.config) != shape:
            raise AlignError(
                f"{reference} and {model}: different shapes ({LlamaShape.from_config(ref.config)} vs {shape})"
            )
        a = {name: ref.get(name).float() for name in ref.tensors}
        b = {name: src.get(name) for name in src.tensors}
        check_same_layout(a, b, shape)
        _check_rotation_options(b, src.config, rotate=rotate, data=data, fit_steps=fit_steps)
        rotations = None
        if data:
            perms, rotations = _match_activations(
                Path(reference),
                Path(model),
                data,
                shape,
                rotate=rotate,
                fit_steps=fit_steps,
                seed=seed,
                progress=progress,
            )
        else:
            perms = weight_matching(a, {k: v.float() for k, v in b.items()}, shape, seed=seed)
        aligned = permute(b, perms, shape)
        if rotations is not None:
            from evomerge.merge.rotation import rotate as apply_rotations

            norms = {name: ref.get(name) for name in a if name.endswith("norm.weight")}
            aligned = apply_rotations(aligned, rotations, shape, norms)
        aligned = {name: t.contiguous() for name, t in aligned.items()}
        before = sum(float((a[k] * b[k].float()).sum()) for k in a)
        after = sum(float((a[k] * aligned[k].float()).sum()) for k in a)
        with staging_dir(out_dir) as tmp:
            save_file(aligned, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy2(src.path / "config.json", tmp / "config.json")
            for name in TOKENIZER_FILES:
                if (src.path / name).is_file():
                    shutil.copy2(src.path / name, tmp / name)
    finally:
        ref.close()
        src.close()
    moved = {key: int((perm != torch.arange(perm.numel())).sum()) for key, perm in perms.items()}
    return {"moved": moved, "inner_product": {"before": before, "after": after}}

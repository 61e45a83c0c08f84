"""Rotation alignment: the exact continuous symmetries of a Llama, beyond the permutations of ``align``.

Permuting units is one symmetry of a transformer; it has larger ones that are just as exact, and two
models trained from different initializations differ by them too:

- the residual stream can be rotated by any orthogonal matrix R (RMSNorm divides by the norm, which a
  rotation keeps; its per-channel weight is folded into the layers that read the normalized stream,
  and the reference's weight put in its place, so both models keep the reference's norm weights);
- each key/value group's values can be rotated by an orthogonal S (the attention weights mix positions,
  not value dimensions; ``o_proj`` undoes S);
- each head's queries and keys can be rotated together inside each RoPE plane (dimensions i and
  i + head_dim/2): RoPE rotates in that plane, and two rotations of one plane commute, so q . k is kept.

``rotation_alignment`` first permutes MLP neurons and heads by activation matching (their activations
do not change under the rotations), then finds each rotation by orthogonal Procrustes on the two
models' activations over the same tokens: the RMS-normalized residual stream at every block's input and
the final norm's, each group's attention output before ``o_proj``, each plane's query and key
projections. ``rotate`` applies rotations; the result computes what the original does, up to float
summation order (a test holds the logits within 1e-4).

Procrustes alone does not connect two zoo bases trained from different initializations (their
streams, rotated as well as they can be, still differ by about half their norm), so ``fit_rotations``
then fits the rotations by gradient descent to the midpoint's next-token loss on the alignment texts
(Git Re-Basin's learned matching, with rotations in place of its straight-through permutations).
Measured on the zoo (BENCHMARKS.md, "Permutation alignment"): the midpoint then keeps what those texts
cover, on items it never saw, and loses what they do not: fit on text like the data you care about.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.align import AlignError, LlamaShape, Perms, activation_matching, padded_batches, permute


@dataclass(frozen=True)
class Rotations:
    """Orthogonal transforms of a model's units, all float64.

    ``residual``: (hidden, hidden), the rotated stream is ``residual @ h``; ``values[layer]``:
    (kv_heads, head_dim, head_dim), one per key/value group; ``planes[layer]``: (kv_heads, head_dim/2)
    angles, plane j of a group's queries and keys (dimensions j and j + head_dim/2) turned by the angle."""

    residual: torch.Tensor
    values: dict[int, torch.Tensor]
    planes: dict[int, torch.Tensor]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rotations:
        """The same rotations with ``fn`` applied to every tensor (a dtype, ``detach``)."""
        return Rotations(
            residual=fn(self.residual),
            values={k: fn(v) for k, v in self.values.items()},
            planes={k: fn(v) for k, v in self.planes.items()},
        )

    @classmethod
    def identity(cls, shape: LlamaShape) -> Rotations:
        eye = torch.eye(shape.head_dim, dtype=torch.float64)
        return cls(
            residual=torch.eye(shape.hidden, dtype=torch.float64),
            values={layer: eye.repeat(shape.kv_heads, 1, 1) for layer in range(shape.layers)},
            planes={
                layer: torch.zeros((shape.kv_heads, shape.head_dim // 2), dtype=torch.float64)
                for layer in range(shape.layers)
            },
        )


_ATTENTION_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")


def check_rotatable(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Refuse what the rotations cannot keep exact, naming it. (Every RoPE variant, scaled ones too,
    turns plane (i, i + head_dim/2) by a position's angle, which commutes with a fixed turn of it.)"""
    if config.get("tie_word_embeddings") or "lm_head.weight" not in state:
        raise AlignError(
            "tie_word_embeddings: a model whose LM head is its embedding cannot be rotated exactly "
            "(the head reads the normalized stream, the embedding writes the raw one); align it without --rotate"
        )
    rope = config.get("rope_parameters") or {}
    if float(config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise AlignError("partial_rotary_factor: only whole-head RoPE is supported by --rotate")


def _turn_planes(tensor: torch.Tensor, angles: torch.Tensor, head_dim: int, heads_per_angle: int) -> torch.Tensor:
    """Rows (or entries, for a bias) of a q/k projection with each head's RoPE planes turned: head h uses
    the angles of group h // heads_per_angle."""
    half = head_dim // 2
    rows = tensor.reshape(-1, head_dim, *tensor.shape[1:])  # (heads, head_dim, ...)
    angle = angles.repeat_interleave(heads_per_angle, dim=0)  # (heads, half)
    extra = (1,) * (rows.dim() - 2)
    cos, sin = angle.cos().reshape(*angle.shape, *extra), angle.sin().reshape(*angle.shape, *extra)
    x, y = rows[:, :half], rows[:, half:]
    return torch.cat([cos * x - sin * y, sin * x + cos * y], dim=1).reshape(tensor.shape)


def _readers(shape: LlamaShape) -> list[tuple[str, str]]:
    """(reader weight, the RMSNorm whose output it reads) for every layer that reads the normalized stream."""
    pairs = [("lm_head.weight", "model.norm.weight")]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        pairs += [(f"{p}{r}.weight", f"{p}input_layernorm.weight") for r in _ATTENTION_READERS]
        pairs += [(f"{p}{r}.weight", f"{p}post_attention_layernorm.weight") for r in _MLP_READERS]
    return pairs


def _fold(state: Mapping[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """``state`` with each RMSNorm weight multiplied into the columns of the layers that read its output
    (the norms themselves left out): what the rotations act on."""
    folded = {k: v for k, v in state.items() if not k.endswith("norm.weight")}
    for reader, norm in _readers(shape):
        folded[reader] = state[reader] * state[norm]
    return folded


def _turn(
    folded: Mapping[str, torch.Tensor], rotations: Rotations, shape: LlamaShape, norms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A folded state rotated, its readers divided by ``norms`` (which become the model's RMSNorm
    weights): differentiable in the rotations, in the dtype of ``folded``."""
    r = rotations.residual
    rep, hd = shape.heads // shape.kv_heads, shape.head_dim
    out = dict(folded)
    out["model.embed_tokens.weight"] = folded["model.embed_tokens.weight"] @ r.T
    for reader, norm in _readers(shape):
        out[reader] = folded[reader] @ r.T / norms[norm]
    out.update(norms)
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        for writer in ("self_attn.o_proj", "mlp.down_proj"):
            out[f"{p}{writer}.weight"] = r @ folded[f"{p}{writer}.weight"]
            if f"{p}{writer}.bias" in folded:
                out[f"{p}{writer}.bias"] = r @ folded[f"{p}{writer}.bias"]
        values = rotations.values[layer]  # (kv, hd, hd)
        for suffix in ("weight", "bias"):
            name = f"{p}self_attn.v_proj.{suffix}"
            if name in out:
                grouped = out[name].reshape(shape.kv_heads, hd, -1)
                out[name] = torch.einsum("gij,gjk->gik", values, grouped).reshape(out[name].shape)
        o = out[f"{p}self_attn.o_proj.weight"].reshape(shape.hidden, shape.kv_heads, rep, hd)
        out[f"{p}self_attn.o_proj.weight"] = torch.einsum("ogrj,gij->ogri", o, values).reshape(shape.hidden, -1)
        for proj, per in (("q_proj", rep), ("k_proj", 1)):
            for suffix in ("weight", "bias"):
                name = f"{p}self_attn.{proj}.{suffix}"
                if name in out:
                    out[name] = _turn_planes(out[name], rotations.planes[layer], hd, per)
    return out


def _new_norms(state: Mapping[str, torch.Tensor], norms: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The RMSNorm weights the rotated model gets, rounded to the model's own dtype of each first (the
    readers are divided by exactly what is stored); zeros refused."""
    chosen = norms if norms is not None else {k: v for k, v in state.items() if k.endswith("norm.weight")}
    out = {}
    for name, weight in chosen.items():
        if bool((weight == 0).any()):
            raise AlignError(f"{name}: has zeros; the rotated model's readers would divide by them")
        out[name] = weight.to(state[name].dtype)
    return out


def rotate(
    state: dict[str, torch.Tensor],
    rotations: Rotations,
    shape: LlamaShape,
    norms: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``state`` with ``rotations`` applied: the same function. Every RMSNorm weight is replaced by the one
    in ``norms`` (the reference's; default: the model's own), the old one folded into the readers.
    Computed in float64; each tensor keeps its dtype."""
    new = {k: v.double() for k, v in _new_norms(state, norms).items()}
    turned = _turn(_fold({k: v.double() for k, v in state.items()}, shape), rotations, shape, new)
    return {k: v.to(state[k].dtype) for k, v in turned.items()}


def _procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q that best maps b's rows onto a's (min ||a - b Q^T||): a ~ Q b."""
    u, _, vt = torch.linalg.svd(a.T @ b)
    return u @ vt


def _capture(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Activations on every real token: ``residual`` (the stream entering each block and the final norm,
    RMS-normalized, stacked), per layer ``values.<l>`` (o_proj's input), ``q.<l>`` and ``k.<l>`` (the
    projections before RoPE)."""
    captured: dict[str, list[torch.Tensor]] = {}
    inner: Any = model.model  # type: ignore[union-attr]  # a Llama: model.model.layers
    mask_now: list[torch.Tensor] = []

    def keep(key: str, x: torch.Tensor) -> None:
        captured.setdefault(key, []).append(x[mask_now[0]].double())

    hooks = [inner.norm.register_forward_pre_hook(lambda _m, args: keep("residual", args[0]))]
    for layer, block in enumerate(inner.layers):
        hooks.append(block.register_forward_pre_hook(lambda _m, args: keep("residual", args[0])))
        attn = block.self_attn
        hooks.append(attn.o_proj.register_forward_pre_hook(lambda _m, args, k=f"values.{layer}": keep(k, args[0])))
        hooks.append(attn.q_proj.register_forward_hook(lambda _m, _a, out, k=f"q.{layer}": keep(k, out)))
        hooks.append(attn.k_proj.register_forward_hook(lambda _m, _a, out, k=f"k.{layer}": keep(k, out)))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                mask_now[:] = [mask.bool()]
                model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    out = {key: torch.cat(values) for key, values in captured.items()}
    residual = out["residual"]
    out["residual"] = residual / residual.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return out


def _by_group(heads: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """Per-head activations (samples, heads * head_dim) as (samples * heads per group, kv groups, head_dim):
    every query head's rows under the key/value group it reads."""
    rep = shape.heads // shape.kv_heads
    grouped = heads.reshape(len(heads), shape.kv_heads, rep, shape.head_dim).transpose(1, 2)
    return grouped.reshape(-1, shape.kv_heads, shape.head_dim)


def _plane_angles(
    a_q: torch.Tensor, b_q: torch.Tensor, a_k: torch.Tensor, b_k: torch.Tensor, shape: LlamaShape
) -> torch.Tensor:
    """Per key/value group and RoPE plane, the angle that best turns b's queries and keys onto a's (the
    2-D Procrustes solution over the group's query heads and its key head together)."""
    half = shape.head_dim // 2

    def planes(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([_by_group(q, shape), k.reshape(len(k), shape.kv_heads, shape.head_dim)])
        return both[..., :half], both[..., half:]

    (ax, ay), (bx, by) = planes(a_q, a_k), planes(b_q, b_k)
    return torch.atan2((ay * bx - ax * by).sum(0), (ax * bx + ay * by).sum(0))


def rotation_alignment(
    reference: torch.nn.Module,
    other: torch.nn.Module,
    input_ids: list[list[int]],
    shape: LlamaShape,
    *,
    pad_token_id: int = 0,
) -> tuple[Perms, Rotations]:
    """The permutations (activation matching) and then the rotations that bring ``other``'s activations
    closest to ``reference``'s on the same inputs. ``other`` is left as it was."""
    perms = activation_matching(reference, other, input_ids, shape, pad_token_id=pad_token_id)
    original = {k: v.clone() for k, v in other.state_dict().items()}
    batches = padded_batches(input_ids, pad_token_id)
    try:
        other.load_state_dict(permute(original, perms, shape))
        b = _capture(other, batches)
    finally:
        other.load_state_dict(original)
    a = _capture(reference, batches)
    values, planes = {}, {}
    for layer in range(shape.layers):
        va, vb = _by_group(a[f"values.{layer}"], shape), _by_group(b[f"values.{layer}"], shape)
        values[layer] = torch.stack([_procrustes(va[:, g], vb[:, g]) for g in range(shape.kv_heads)])
        planes[layer] = _plane_angles(a[f"q.{layer}"], b[f"q.{layer}"], a[f"k.{layer}"], b[f"k.{layer}"], shape)
    return perms, Rotations(residual=_procrustes(a["residual"], b["residual"]), values=values, planes=planes)


def _skew_exp(generator: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix (batch) from an unconstrained square one: exp(X - X^T)."""
    return torch.matrix_exp(generator - generator.transpose(-1, -2))


def fit_rotations(
    reference: torch.nn.Module,
    other: dict[str, torch.Tensor],
    start: Rotations,
    shape: LlamaShape,
    input_ids: list[list[int]],
    *,
    norms: dict[str, torch.Tensor],
    steps: int = 300,
    lr: float = 0.01,
    batch_size: int = 32,
    seed: int = 0,
    pad_token_id: int = 0,
    progress: bool = False,
) -> Rotations:
    """Rotations, starting at ``start``, that make the midpoint of ``reference`` and ``other`` rotated
    predict ``input_ids`` best (next-token loss, Adam on each rotation's generator: the residual's,
    each value group's, each plane's angle). The midpoint only: drawing each step's point from
    t in [0.2, 0.8] instead left the zoo's midpoint at 7.6 nats per copied item after 300 steps
    (0.09 fitted at the midpoint).

    The learned variant of Git Re-Basin's matching (its straight-through estimator fits the midpoint's
    loss the same way, over permutations): every rotation keeps ``other``'s function exactly, so only
    where the interpolation path runs is fitted. Fit on texts the aligned models are not judged on."""
    from torch.func import functional_call
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    residual = torch.zeros_like(start.residual, requires_grad=True)
    values = torch.zeros((shape.layers, shape.kv_heads, shape.head_dim, shape.head_dim), dtype=torch.float64)
    values.requires_grad_(True)
    angles = torch.zeros((shape.layers, shape.kv_heads, shape.head_dim // 2), dtype=torch.float64, requires_grad=True)
    base_values = torch.stack([start.values[layer] for layer in range(shape.layers)])
    base_planes = torch.stack([start.planes[layer] for layer in range(shape.layers)])

    def current() -> Rotations:
        turned = _skew_exp(values) @ base_values
        return Rotations(
            residual=_skew_exp(residual) @ start.residual,
            values={layer: turned[layer] for layer in range(shape.layers)},
            planes={layer: base_planes[layer] + angles[layer] for layer in range(shape.layers)},
        )

    fixed = {k: v.detach().float() for k, v in reference.state_dict().items() if k in other}
    folded = _fold({k: v.detach().float() for k, v in other.items()}, shape)  # once: what the rotations act on
    new_norms = {k: v.float() for k, v in _new_norms(other, norms).items()}
    optimizer = torch.optim.Adam(
        [
            # Adam moves every entry of a generator by about lr, so a wider matrix would turn further per
            # step: scaled to turn as the zoo's (hidden 128, head_dim 32, where lr was chosen) do
            {"params": [residual], "lr": lr * math.sqrt(128 / shape.hidden)},
            {"params": [values], "lr": lr * math.sqrt(32 / shape.head_dim)},
            {"params": [angles], "lr": lr},
        ]
    )
    was_training = reference.training
    reference.eval()
    bar = tqdm(range(steps), desc="fitting rotations", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for _ in bar:
            chosen = torch.randperm(len(input_ids), generator=generator)[:batch_size].tolist()
            ((ids, mask),) = padded_batches([input_ids[i] for i in chosen], pad_token_id, size=batch_size)
            rotated = _turn(folded, current().map(torch.Tensor.float), shape, new_norms)
            midpoint = {k: 0.5 * (fixed[k] + rotated[k]) for k in fixed}
            logits = functional_call(
                reference, midpoint, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
            ).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(midpoint_loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        reference.train(was_training)
    with torch.no_grad():
        return current().map(torch.Tensor.detach)

"""Whole-tensor merge functions, one per declared algorithm, and the engine's method registry.

Every method is declared once, torch-free, in ``evomerge.recipe.methods.SPECS`` (names, parameters,
defaults, inputs; for the task-arithmetic family its sparsification and consensus). This module
gives each declaration its function (``METHODS``, built from ``SPECS`` and ``WHOLE_TENSOR``), which
the engine runs on tensors merged whole; ``merge/blocks.py`` derives the block kernels for large
tensors from the same declarations.

Every function has the same call shape so the engine (and the in-memory evaluator) can run any of
them in one loop over tensors:

    fn(tensors, base, model_params, params, generator) -> Tensor

- ``tensors``: the input tensors in recipe order, already in the compute dtype. For methods whose
  spec has ``uses_base=True`` (or ``optional_base=True`` and a base is configured) the base
  model's tensor is *not* in this list (it is ``base``); for the others the base model, when it is
  listed as an input, is just another entry.
- ``model_params``: one dict per entry of ``tensors`` with that input's resolved parameters.
- ``params``: the resolved global (shared) parameters.
- ``generator``: a seeded ``torch.Generator`` for randomized methods (dare, della), else ``None``.

``METHODS[name].fn`` checks its inputs against the declaration (counts, base, dtypes, shapes)
before computing; the algorithm functions below (``linear``, ``slerp``, ...,
``generalized_task_arithmetic``) do not, since the block kernels call them on pieces of inputs the
plan has already checked.

Parameter names, defaults and semantics follow mergekit (0.1.5), the reference implementation;
tests hold each method to mergekit's output.

Conventions:

- Methods compute in the dtype of their inputs and return that dtype (linear and slerp, like
  mergekit, accumulate half-precision inputs in float32 and cast back). Non-floating inputs raise
  ``TypeError``.
- Inputs are never modified. An output may *alias* an input where the method is an identity
  (``passthrough`` without ``scale``, the task-arithmetic family with no inputs besides the base):
  callers must not write into a result in place unless they own its inputs.
- Randomized methods draw every random number from ``generator``, a CPU generator, on the CPU, and
  move the mask to the tensor's device: the same seed gives the same mask on every device (a CUDA
  generator draws another stream, so a candidate scored on a GPU worker would not be the model its
  exported recipe makes on CPU). mergekit draws from torch's global RNG; our draws use the same torch
  calls in the same order, so on CPU ``torch.manual_seed(s)`` before mergekit and
  ``torch.Generator().manual_seed(s)`` here happen to give the same masks, but that is a coincidence
  of implementation, not a promise.
- Magnitude selection (ties, breadcrumbs) keeps exactly mergekit's count of entries. mergekit picks
  with a full (unstable) sort; for large tensors we select with ``kthvalue`` (several times
  faster) and break exact ties in ``|delta|`` by index, so only *tied* boundary entries can differ.
  Tensors up to ``EXACT_SORT_MAX_NUMEL`` elements use mergekit's sort call, and match it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from evomerge.recipe import methods as declared
from evomerge.recipe.methods import (  # noqa: F401 (REQUIRED re-exported)
    REQUIRED,
    Algorithm,
    Consensus,
    Sparsification,
    check_count,
)

TensorFn = Callable[
    [Sequence[Tensor], Tensor | None, Sequence[Mapping[str, Any]], Mapping[str, Any], torch.Generator | None],
    Tensor,
]
"""An algorithm's function on tensors (what block kernels call on pieces of inputs)."""


class MethodFn(Protocol):
    """The engine's call shape of every method (``statistics``: data-aware methods only)."""

    def __call__(
        self,
        tensors: Sequence[Tensor],
        base: Tensor | None,
        model_params: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        generator: torch.Generator | None = None,
        statistics: Sequence[Tensor | None] | None = None,
    ) -> Tensor: ...


EXACT_SORT_MAX_NUMEL = 1 << 16
"""Magnitude selection sorts (as mergekit does) up to this many elements, else uses ``kthvalue``."""


@dataclass(frozen=True, kw_only=True)
class MethodSpec(declared.MethodSpec):
    """A method's declaration (``evomerge.recipe.methods.MethodSpec``) with its whole-tensor function."""

    fn: MethodFn


# ----------------------------------------------------------------------------------------------
# input checks


def _check(
    spec: declared.MethodSpec,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
) -> None:
    """Validate what the declaration implies: input counts, the base's presence (required with
    ``uses_base``, allowed with ``optional_base``, else refused), floating dtypes, equal shapes."""
    name = spec.name
    check_count(name, len(tensors), spec.min_inputs, spec.max_inputs)
    if len(model_params) != len(tensors):
        raise ValueError(f"{name}: got {len(model_params)} model_params for {len(tensors)} tensors")
    if base is None and spec.uses_base:
        raise ValueError(f"{name}: needs a base model tensor")
    if base is not None and not (spec.uses_base or spec.optional_base):
        raise ValueError(f"{name}: takes no distinguished base tensor; pass the base as an input")
    every = list(tensors) + ([base] if base is not None else [])
    for tensor in every:
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: merge methods need floating-point tensors, got {tensor.dtype}")
    shape = every[0].shape
    if any(t.shape != shape for t in every[1:]):
        raise ValueError(f"{name}: input shapes disagree: {[tuple(t.shape) for t in every]}")


def _need_generator(name: str, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{name}: randomized sparsification needs a seeded torch.Generator")
    return generator


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# linear, passthrough


def linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Weighted average (or weighted sum with ``normalize: false``).

    As in mergekit there is no guard for weights summing to zero: with ``normalize`` the result
    is then inf/nan.
    """
    weights = [float(p["weight"]) for p in model_params]
    dtype = tensors[0].dtype
    out = tensors[0].to(_accumulation_dtype(dtype)) * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor, alpha=weight)
    if params["normalize"]:
        out.div_(sum(weights))
    return out.to(dtype)


def passthrough(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """The single input, times its ``scale`` when set (returned as is, not copied, without)."""
    scale = model_params[0]["scale"]
    return tensors[0] if scale is None else tensors[0] * float(scale)


# ----------------------------------------------------------------------------------------------
# spherical interpolation


def slerp_coefficients(
    t: float, dot: float, norm_a: float, norm_b: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """Slerp's two coefficients from the inputs' dot product and norms (shared with the block-wise
    kernel, which accumulates those three numbers over blocks)."""
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_tensors(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """mergekit's ``slerp``: spherical interpolation of whole (flattened) tensors.

    The angle comes from the normalized vectors; the unnormalized ones are interpolated. Norms
    at most ``eps`` count as 1; when ``|cos| > dot_threshold`` (colinear or antipodal) it falls
    back to linear interpolation. Works in float32 (float64 for float64 inputs).
    """
    work = _accumulation_dtype(v0.dtype)
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    if a.numel() == 0:
        return v0.clone()
    coef_a, coef_b = slerp_coefficients(
        t,
        float(torch.dot(a, b)),
        float(torch.linalg.vector_norm(a)),
        float(torch.linalg.vector_norm(b)),
        dot_threshold=dot_threshold,
        eps=eps,
    )
    out = a * coef_a
    out.add_(b, alpha=coef_b)
    return out.to(v0.dtype).reshape(v0.shape)


def slerp(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spherical interpolation from the base (``t=0``) to the one other input (``t=1``)."""
    assert base is not None  # uses_base: METHODS' checks and the plan always give a base
    return slerp_tensors(float(params["t"]), base, tensors[0])


def nuslerp_coefficients(
    t: float, dot: Tensor, norm0: Tensor, norm1: Tensor, *, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """nuslerp's two coefficients per vector from the dot products and norms (any matching shapes;
    shared with the block-wise kernel, which sums those numbers over blocks). Norms are clamped to
    1e-7; exactly colinear or antipodal vectors (``1 - cos^2 <= eps^2``) get ``1 - t`` and ``t``."""
    norm0, norm1 = norm0.clamp(min=1e-7), norm1.clamp(min=1e-7)
    cos = (dot / (norm0 * norm1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    coef0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef0, coef1


def nuslerp_tensors(
    t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> Tensor:
    """mergekit's ``nuslerp`` kernel: slerp of whole tensors (``flatten``), else of vectors along
    the last dimension, or along dimension 0 with ``row_wise`` (mergekit's naming).

    Exactly colinear or antipodal vectors (``1 - cos^2 <= eps^2``) are interpolated linearly.
    """
    shape = v0.shape
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    coef0, coef1 = nuslerp_coefficients(
        t,
        torch.linalg.vecdot(v0, v1, dim=-1).unsqueeze(-1),
        torch.linalg.vector_norm(v0, dim=-1, keepdim=True),
        torch.linalg.vector_norm(v1, dim=-1, keepdim=True),
        eps=eps,
    )
    out = v0 * coef0
    out.addcmul_(v1, coef1)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_t(model_params: Sequence[Mapping[str, Any]]) -> float:
    """nuslerp's interpolation point from the two inputs' weights: ``w1 / (w0 + w1)``, 0.5 if that
    sum is ~0."""
    w0, w1 = (float(p["weight"]) for p in model_params)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Slerp of two inputs at ``t = weight[1] / (weight[0] + weight[1])`` (0.5 if that sum is ~0);
    with a base, of their task vectors, added back to the base."""
    t = nuslerp_t(model_params)
    options = {"row_wise": bool(params["nuslerp_row_wise"]), "flatten": bool(params["nuslerp_flatten"])}
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], **options)
    out = nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, **options)
    return out.add_(base)


# ----------------------------------------------------------------------------------------------
# model stock


def model_stock(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Model Stock: interpolate from the base toward the inputs' average by
    ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors.

    Whole tensors by default; per row (last dimension) with ``filter_wise`` (1-D tensors are then
    one row). Where the denominator vanishes (|.| < 1e-6) the base is kept.
    """
    assert base is not None  # uses_base: METHODS' checks and the plan always give a base
    shape = base.shape
    filter_wise = bool(params["filter_wise"])
    if filter_wise:
        view = (lambda x: x.unsqueeze(0)) if base.dim() == 1 else (lambda x: x)
    else:
        view = lambda x: x.reshape(-1)  # noqa: E731
    w0 = view(base)
    offsets = [view(x) - w0 for x in tensors]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos_sum: Tensor | None = None
    pairs = 0
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            cos = (torch.linalg.vecdot(offsets[i], offsets[j], dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(
                -1, 1
            )
            cos_sum = cos if cos_sum is None else cos_sum + cos
            pairs += 1
    del offsets
    assert cos_sum is not None  # at least two inputs (min_inputs), so at least one pair
    cos = (cos_sum / pairs).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    average = view(tensors[0]).clone()
    for x in tensors[1:]:
        average.add_(view(x))
    average.div_(n)
    return average.mul_(t).addcmul_(w0, 1 - t).reshape(shape)


# ----------------------------------------------------------------------------------------------
# sparsification (operates on task vectors the caller owns: may write into them)


def _mask_(delta: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    """``delta * mask`` in place; with ``rescale``, scaled to keep delta's L1 norm (mergekit's
    ``rescale_norm=l1``), unless either norm is below ``eps``."""
    before = delta.abs().sum() if rescale else None
    delta.mul_(mask)
    if rescale:
        assert before is not None  # computed above whenever rescale
        after = delta.abs().sum()
        if not (before < eps or after < eps):
            delta.mul_(before / after)
    return delta


def _some_ties(equal: Tensor, count: int, *, last: bool) -> Tensor:
    """The first (or ``last``) ``count`` True entries, in index order, of the 1-D bool ``equal``."""
    if int(equal.sum()) <= count:
        return equal
    index = equal.nonzero().squeeze(1)
    out = torch.zeros_like(equal)
    out[index[-count:] if last else index[:count]] = True
    return out


def _rank_range_mask(values: Tensor, lo: int, hi: int) -> Tensor:
    """Boolean mask of the entries of 1-D ``values`` whose ascending rank is in ``[lo, hi)``,
    exact ties ranked by index. O(n) via ``kthvalue`` instead of a sort."""
    n = values.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    keep = None
    if lo > 0:  # drop the lo smallest: v is the largest dropped value
        v = torch.kthvalue(values, lo).values
        keep = values > v
        surplus = n - int(keep.sum()) - lo  # entries equal to v ranked >= lo: the last ones
        if surplus > 0:
            keep |= _some_ties(values == v, surplus, last=True)
    if hi < n:  # keep the hi smallest: v is the smallest dropped value
        v = torch.kthvalue(values, hi + 1).values
        lower = values < v
        deficit = hi - int(lower.sum())  # entries equal to v ranked < hi: the first ones
        if deficit > 0:
            lower |= _some_ties(values == v, deficit, last=False)
        keep = lower if keep is None else keep.logical_and_(lower)
    return keep if keep is not None else torch.ones(n, dtype=torch.bool, device=values.device)


def _selection_magnitudes(delta: Tensor) -> Tensor:
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def sparsify_magnitude(delta: Tensor, density: float, rescale: bool) -> Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES trimming)."""
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return delta.zero_()
    k = max(1, int(density * n))
    w = _selection_magnitudes(delta)
    if n <= EXACT_SORT_MAX_NUMEL:
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        mask[torch.argsort(w, descending=True)[:k]] = True
    else:
        mask = _rank_range_mask(w, n - k, n)
    return _mask_(delta, mask.reshape(delta.shape), rescale)


def sparsify_magnitude_outliers(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Model Breadcrumbs: drop the ``int(gamma * n)`` largest-magnitude entries, then the smallest,
    keeping ``int(density * n)`` (the outlier cut shrinks if both do not fit)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    w = _selection_magnitudes(delta)
    if n <= EXACT_SORT_MAX_NUMEL:
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        if target > 0:
            mask[torch.sort(w, descending=False).indices[n_bottom : n_bottom + target]] = True
    else:
        mask = _rank_range_mask(w, n_bottom, n_bottom + target)
    return _mask_(delta, mask.reshape(delta.shape), rescale)


def _random_work_dtype(delta: Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 kernel on CPU: mergekit works in float32 there.
    if delta.device.type != "cpu" or delta.dtype in (torch.bfloat16, torch.float64):
        return delta.dtype
    return torch.float32


def sparsify_random(delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability ``density`` (L1-rescaled with ``rescale``).

    ``generator`` may be ``None`` only when nothing is drawn (``density >= 1``)."""
    if density >= 1:
        return delta
    work = _random_work_dtype(delta)
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=work), generator=generator).to(delta.device)
    if work != delta.dtype:
        return _mask_(delta.to(work), mask, rescale).to(delta.dtype)
    return _mask_(delta, mask, rescale)


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities: per row (dimension 1; 1-D tensors are one row), entries ranked
    by magnitude get ``density - epsilon`` (smallest) up to ``density + epsilon`` (largest),
    linearly in rank. Shape ``delta.shape`` with 1-D promoted to ``[1, n]``. A row of a single
    entry gets ``density`` (mergekit divides 0 by 0 there and fails)."""
    work = _random_work_dtype(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    positions = torch.arange(n, device=delta.device).view(1, n, *([1] * (rows.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    del order, positions
    if n == 1:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=work, device=delta.device)
    else:
        # mergekit: ranks 1..n, (rank - min) / (max - min); the same float ops, so the same values
        rank_norm = (ranks.to(work) / (n - 1)).clamp_(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def sparsify_della(
    delta: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None
) -> Tensor:
    """DELLA MagPrune: keep entries with ``della_probabilities`` (L1-rescaled with ``rescale``).

    Like mergekit, rescaling restores the tensor's L1 norm (not DELLA's per-entry ``1/p``), and
    ``density +/- epsilon`` must lie inside (0, 1) whenever ``0 < density < 1``. ``generator`` may
    be ``None`` only when nothing is drawn (``density`` outside (0, 1)).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: epsilon must keep density +/- epsilon inside (0, 1); got density={density}, epsilon={epsilon}"
        )
    work = _random_work_dtype(delta)
    probabilities = della_probabilities(delta, density, epsilon).cpu()  # drawn on the CPU: see the conventions
    mask = torch.bernoulli(probabilities, generator=generator).reshape(delta.shape).to(delta.device)
    if work != delta.dtype:
        return _mask_(delta.to(work), mask, rescale).to(delta.dtype)
    return _mask_(delta, mask, rescale)


# ----------------------------------------------------------------------------------------------
# the generalized task-arithmetic family


def generalized_task_arithmetic(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None,
    *,
    name: str,
    sparsification: Sparsification | None,
    consensus: Consensus | None,
) -> Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge (every member of the family; ``name`` is the
    member's, for errors).

    For each input: task vector ``x - base``, sparsified (``magnitude`` / ``random`` /
    ``magnitude_outliers`` / ``della``, with the input's ``density``, ``gamma``, ``epsilon``),
    times its ``weight``. With a ``consensus`` (``sum``: the sign of the summed weighted vectors,
    TIES; ``count``: the majority of signs) only entries agreeing with the elected sign count,
    and zeros never do. Sum; with ``normalize`` divide by the sum of weights (per entry, of the
    agreeing inputs under consensus; a zero sum, or |sum| < 1e-8 without consensus, divides by
    1); times ``lambda``; plus the base.
    """
    assert base is not None  # uses_base: METHODS' checks and the plan always give a base
    if not tensors:
        return base
    rescale = bool(params["rescale"])
    weights = [float(p["weight"]) for p in model_params]

    def task_vector(x: Tensor, p: Mapping[str, Any]) -> Tensor:
        delta = torch.sub(x, base)
        density = float(p["density"])
        if sparsification is None:
            return delta
        if sparsification is Sparsification.MAGNITUDE:
            return sparsify_magnitude(delta, density, rescale)
        if sparsification is Sparsification.MAGNITUDE_OUTLIERS:
            return sparsify_magnitude_outliers(delta, density, float(p["gamma"]), rescale)
        if sparsification is Sparsification.RANDOM:
            return sparsify_random(delta, density, rescale, _need_generator(name, generator) if density < 1 else None)
        if sparsification is Sparsification.DELLA:
            gen = _need_generator(name, generator) if 0 < density < 1 else None
            return sparsify_della(delta, density, float(p["epsilon"]), rescale, gen)
        raise ValueError(f"{name}: unknown sparsification {sparsification!r}")

    deltas = [task_vector(x, p) for x, p in zip(tensors, model_params)]
    return combine_task_vectors(deltas, base, weights, params, consensus=consensus, name=name)


def combine_task_vectors(
    deltas: list[Tensor],
    base: Tensor,
    weights: Sequence[float],
    params: Mapping[str, Any],
    *,
    consensus: Consensus | None,
    name: str,
) -> Tensor:
    """The element-wise second half of the task-arithmetic family: weight, elect signs, sum,
    normalize, scale by ``lambda``, add the base. Consumes (writes into) ``deltas``.

    Shared by the whole-tensor functions and the block-wise kernels (``merge/blocks.py``), so both
    do the same float operations on every element.
    """
    normalize = bool(params["normalize"])
    if consensus is None:
        mixed: Tensor | None = None
        for delta, w in zip(deltas, weights):
            if mixed is None:
                mixed = delta.mul_(w)
            else:
                mixed.add_(delta, alpha=w)
        assert mixed is not None  # deltas is never empty: callers return the base when there are no inputs
        deltas.clear()
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    else:
        for d, w in zip(deltas, weights):
            d.mul_(w)
        if consensus is Consensus.SUM:
            elected = deltas[0].clone()
            for d in deltas[1:]:
                elected.add_(d)
        elif consensus is Consensus.COUNT:
            elected = deltas[0].sign()
            for d in deltas[1:]:
                elected.add_(d.sign())
        else:
            raise ValueError(f"{name}: unknown consensus method {consensus!r}")
        # +1 where the elected sign is >= 0, else -1: d agrees with it iff d * sign > 0 (zeros never do)
        sign = torch.ge(elected, 0).to(elected.dtype).mul_(2).sub_(1)
        del elected
        mixed = None
        divisor = torch.zeros_like(base) if normalize else None
        for d, w in zip(deltas, weights):
            agrees = torch.mul(d, sign).gt_(0)
            d.mul_(agrees)
            if mixed is None:
                mixed = d
            else:
                mixed.add_(d)
            if divisor is not None:
                divisor.add_(agrees, alpha=w)
            del agrees
        assert mixed is not None  # deltas is never empty (see above)
        deltas.clear()
        del sign
        if divisor is not None:
            divisor.add_(divisor == 0)  # no agreeing input: divide by 1
            mixed.div_(divisor)
    lam = float(params["lambda"])
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


# ----------------------------------------------------------------------------------------------
# data-aware methods: each input comes with a statistic (``Statistic``), computed from data


def _linear_fallback(tensors: Sequence[Tensor], model_params: Sequence[Mapping[str, Any]]) -> Tensor:
    return linear(tensors, None, model_params, {"normalize": True})


def fisher(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
    statistics: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Fisher merging: ``sum_i w_i (F_i + floor) theta_i / sum_i w_i (F_i + floor)`` per entry, with
    ``F_i`` input i's diagonal Fisher (same shape as the tensor). A tensor with no Fisher for some input
    (never touched by the loss's gradient, e.g. a tied head) is averaged with the weights alone."""
    if statistics is None or any(f is None for f in statistics):
        return _linear_fallback(tensors, model_params)
    dtype = _accumulation_dtype(tensors[0].dtype)
    floor = float(params["fisher_floor"])
    numerator = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for tensor, fisher_diag, p in zip(tensors, statistics, model_params):
        assert fisher_diag is not None
        if fisher_diag.shape != tensor.shape:
            raise ValueError(
                f"fisher: Fisher of shape {tuple(fisher_diag.shape)} for a tensor of shape {tuple(tensor.shape)}"
            )
        w = float(p["weight"]) * (fisher_diag.to(device=tensor.device, dtype=dtype) + floor)
        numerator.addcmul_(w, tensor.to(dtype))
        denominator.add_(w)
    return numerator.div_(denominator).to(tensors[0].dtype)


def regmean(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
    statistics: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """RegMean: for a linear layer's weight ``W_i`` (out x in) with input Gram ``G_i`` (in x in), the
    minimizer of ``sum_i w_i ||X_i W^T - X_i W_i^T||^2``: ``W = (sum_i w_i W_i G_i) (sum_i w_i G_i)^-1``,
    each ``G_i``'s off-diagonal entries first scaled by ``alpha`` (alpha = 1: the exact regression;
    alpha = 0: a per-input-feature weighted average). Tensors without a Gram (embeddings, norms,
    biases) are averaged with the weights."""
    if statistics is None or any(g is None for g in statistics) or tensors[0].dim() != 2:
        return _linear_fallback(tensors, model_params)
    alpha = float(params["alpha"])
    columns = tensors[0].shape[1]
    device = tensors[0].device
    gram_sum = torch.zeros((columns, columns), dtype=torch.float64, device=device)
    product_sum = torch.zeros((tensors[0].shape[0], columns), dtype=torch.float64, device=device)
    for tensor, gram, p in zip(tensors, statistics, model_params):
        assert gram is not None
        if gram.shape != (columns, columns):
            raise ValueError(f"regmean: Gram of shape {tuple(gram.shape)} for a weight of shape {tuple(tensor.shape)}")
        g = gram.to(device=device, dtype=torch.float64)
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        w = float(p["weight"])
        gram_sum.add_(g, alpha=w)
        product_sum.add_(tensor.to(torch.float64) @ g, alpha=w)
    # W gram_sum = product_sum, gram_sum symmetric: solve gram_sum W^T = product_sum^T (LU: deterministic,
    # unlike lstsq, so a recipe merges to the same bits every time); a singular Gram (an input feature
    # no item ever excites) falls back to the pseudo-inverse
    solved, info = torch.linalg.solve_ex(gram_sum, product_sum.T)
    if int(info) != 0:
        solved = torch.linalg.pinv(gram_sum, hermitian=True) @ product_sum.T
    return solved.T.to(tensors[0].dtype)


# ----------------------------------------------------------------------------------------------
# the registry: one function per declared method


WHOLE_TENSOR: dict[Algorithm, Callable[[declared.MethodSpec], Callable[..., Tensor]]] = {
    Algorithm.LINEAR: lambda spec: linear,
    Algorithm.PASSTHROUGH: lambda spec: passthrough,
    Algorithm.SLERP: lambda spec: slerp,
    Algorithm.NUSLERP: lambda spec: nuslerp,
    Algorithm.MODEL_STOCK: lambda spec: model_stock,
    Algorithm.TASK_ARITHMETIC: lambda spec: partial(
        generalized_task_arithmetic, name=spec.name, sparsification=spec.sparsification, consensus=spec.consensus
    ),
    Algorithm.FISHER: lambda spec: fisher,
    Algorithm.REGMEAN: lambda spec: regmean,
}
"""Per algorithm: the (unchecked) whole-tensor function of a declared method."""


def _checked(spec: declared.MethodSpec, compute: Callable[..., Tensor]) -> MethodFn:
    """``compute`` behind the input checks its declaration implies (see ``_check``). Data-aware
    methods also take ``statistics``: per input, its statistic for this tensor (or ``None``)."""

    def fn(
        tensors: Sequence[Tensor],
        base: Tensor | None,
        model_params: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        generator: torch.Generator | None = None,
        statistics: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        _check(spec, tensors, base, model_params)
        if spec.statistic is None:
            return compute(tensors, base, model_params, params, generator)
        if statistics is not None and len(statistics) != len(tensors):
            raise ValueError(f"{spec.name}: got {len(statistics)} statistics for {len(tensors)} tensors")
        return compute(tensors, base, model_params, params, generator, statistics)

    fn.__name__ = fn.__qualname__ = spec.name
    fn.__doc__ = spec.summary
    return fn


def implement(spec: declared.MethodSpec) -> MethodSpec:
    """The declaration with its function; a declared algorithm without one fails at import."""
    if spec.algorithm not in WHOLE_TENSOR:
        raise NotImplementedError(f"merge method {spec.name!r}: no whole-tensor function for {spec.algorithm!r}")
    declaration = {f.name: getattr(spec, f.name) for f in fields(spec)}
    return MethodSpec(**declaration, fn=_checked(spec, WHOLE_TENSOR[spec.algorithm](spec)))


METHODS: dict[str, MethodSpec] = {name: implement(spec) for name, spec in declared.SPECS.items()}
"""The engine's registry: method name -> declaration and function, for every declared method."""


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with an error that lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise declared.unknown_method(name) from None

"""Block-wise merging: large tensors are merged one block of rows at a time.

Why: a 1B model's embedding has 65M entries. Merged whole, every input is first copied to float32
(262 MB each), every intermediate is another fresh 262 MB allocation, and fresh large allocations
are page-faulted in at ~1.5 GB/s on this kind of machine. A block of ``BLOCK_ELEMENTS`` entries
(1 MiB in float32) keeps every temporary in cache and in malloc's reuse pool: peak memory is a few
MB per input and the arithmetic runs at cache speed (see BENCHMARKS.md, "Merge").

What needs the whole tensor is computed in earlier passes over the same blocks:
- TIES trimming keeps the ``k`` largest ``|delta|`` entries. Histograms of the float32 bit patterns
  of ``|delta|`` (non-negative floats order like their bits: 16 high bits, then the 16 low bits
  inside the boundary bin) give the exact k-th largest value and how many entries equal to it are
  kept, so the kept set is exactly the whole-tensor selection's (``_rank_range_mask``: exact ties
  broken by index), without a sort and without holding the tensor (``_RadixSelect``).
- slerp's and nuslerp's angle, Model Stock's mean cosine: dot products and norms, summed over
  blocks in float64.
- DARE's L1 rescale: the masks are drawn from one random stream per input, drawn again in order
  for the output pass.
Everything else is element-wise and gives the same numbers block by block as whole.

Which method gets which kernel follows from its declaration (``evomerge.recipe.methods.SPECS``):
one kernel per algorithm (``KERNELS``), and for the task-arithmetic family one block selector per
sparsification (``SELECTORS``). Tensors of at most ``WHOLE_TENSOR_MAX`` entries (all of them in small
models, so the mergekit parity tests and the search's in-memory candidates), float64 merges, and
methods whose sparsification has no block selector (breadcrumbs' ``magnitude_outliers``, della) are
merged whole by the method's own function.

Randomness differs between the two paths: whole tensors draw DARE masks with ``torch.bernoulli``
(mergekit's call), blocks from a numpy stream per (tensor, input) (``bernoulli`` costs ~11 ns per
entry on CPU, numpy ~2). Both are deterministic in the seed, and every entry point (disk merge,
in-memory materialization) takes the same path for the same tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import EllipsisType
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from evomerge.merge.methods import (
    EXACT_SORT_MAX_NUMEL,
    TensorFn,
    combine_task_vectors,
    linear,
    model_stock,
    nuslerp,
    nuslerp_coefficients,
    nuslerp_t,
    slerp_coefficients,
)
from evomerge.recipe.methods import SPECS, Algorithm, MethodSpec, Sparsification

BLOCK_ELEMENTS = 1 << 18
"""Entries per block (1 MiB in float32): small enough for L2 cache, large enough that per-op
overhead is a few percent."""

WHOLE_TENSOR_MAX = EXACT_SORT_MAX_NUMEL
"""Tensors up to this many entries are merged whole (and select with mergekit's exact sort)."""

RELEASE_ELEMENTS = 1 << 22
"""Mapped pages of finished rows are dropped in runs of about this many entries."""

HIGH_BINS = 1 << 16
"""Histogram bins per radix level: 16 bits of a float32 bit pattern."""

Block = tuple["slice | EllipsisType", Tensor]
"""(rows, merged rows); ``...`` (Ellipsis) stands for every row of a tensor merged whole."""
BlockKernel = Callable[["JobInputs", Sequence[Mapping[str, Any]], Mapping[str, Any], int], Iterator[Block]]
"""``kernel(inputs, model_params, params, seed)`` yields ``(rows, merged rows)`` in row order."""


class JobInputs:
    """One job's stored tensors (zero-copy views of mapped files), read a block of rows at a time.

    ``read(rows)`` copies the rows into the compute dtype on the compute device; the rows read
    before are then released (``release(rows)``, which drops their mapped pages), so resident memory
    stays about one block per input whatever the tensor's size.
    """

    def __init__(
        self,
        stored: Sequence[Tensor],
        base: Tensor | None,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        release: Callable[[slice | EllipsisType], None] | None = None,
        block_elements: int | None = None,
    ):
        self.stored = list(stored)
        self.base = base
        self.dtype = dtype
        self.device = torch.device(device)
        self._release = release
        self._last: slice | EllipsisType | None = None
        self._pending: slice | None = None
        reference = base if base is not None else self.stored[0]
        self.shape = tuple(reference.shape)
        self.numel = reference.numel()
        self.block_elements = block_elements or BLOCK_ELEMENTS
        self._row_elements = max(1, self.numel // max(self.shape[0], 1)) if self.shape else 1

    def row_blocks(self) -> list[slice]:
        """Consecutive row ranges of about ``block_elements`` entries each (at least one row)."""
        rows = self.shape[0]
        step = max(1, self.block_elements // self._row_elements)
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]

    def _switch_to(self, rows: slice | EllipsisType) -> None:
        """Release the rows read before, in runs of about ``RELEASE_ELEMENTS`` entries (one madvise
        per run and input instead of one per block); a jump (a new pass) releases at once."""
        last = self._last
        self._last = rows
        if last is None or self._release is None or last == rows:
            return
        if not (isinstance(last, slice) and isinstance(rows, slice)):  # a whole-tensor read
            self._release(last)
            return
        pending = self._pending
        if pending is not None and pending.stop == last.start:
            pending = slice(pending.start, last.stop)
        else:
            if pending is not None:
                self._release(pending)
            pending = last
        if rows.start != pending.stop or (pending.stop - pending.start) * self._row_elements >= RELEASE_ELEMENTS:
            self._release(pending)
            pending = None
        self._pending = pending

    def read(self, rows: slice | EllipsisType) -> tuple[list[Tensor], Tensor | None]:
        """The inputs' and the base's rows, in the compute dtype (never to be written into)."""
        self._switch_to(rows)
        xs = [t[rows].to(device=self.device, dtype=self.dtype) for t in self.stored]
        base = self.base[rows].to(device=self.device, dtype=self.dtype) if self.base is not None else None
        return xs, base

    def read_stored(self, index: int, rows: slice) -> Tensor:
        """Input ``index``'s rows as stored (no conversion): for copies."""
        self._switch_to(rows)
        return self.stored[index][rows]


# ----------------------------------------------------------------------------------------------
# element-wise methods


def elementwise(fn: TensorFn) -> BlockKernel:
    """The block kernel of an element-wise method: the method's own function on each block."""

    def kernel(inputs: JobInputs, model_params, params, seed: int) -> Iterator[Block]:
        for rows in inputs.row_blocks():
            xs, base = inputs.read(rows)
            yield rows, fn(xs, base, model_params, params, None)

    return kernel


def passthrough_blocks(inputs: JobInputs, model_params, params, seed: int) -> Iterator[Block]:
    """Copies the stored rows unconverted (the writer casts once, to the output dtype), or scales."""
    scale = model_params[0]["scale"]
    for rows in inputs.row_blocks():
        if scale is None:
            yield rows, inputs.read_stored(0, rows)
        else:
            (x,), _ = inputs.read(rows)
            yield rows, x * float(scale)


def _gram(blocks: list[slice], vectors: Callable[[slice], Sequence[Tensor]]) -> np.ndarray:
    """Dot products of every pair of the whole-tensor vectors that ``vectors(rows)`` gives block by
    block, summed over the blocks in float64 (the Gram matrix; norms on its diagonal)."""
    gram: np.ndarray | float = 0.0
    for rows in blocks:
        stacked = torch.stack([v.reshape(-1) for v in vectors(rows)])
        gram = gram + (stacked @ stacked.T).double().cpu().numpy()
    return cast(np.ndarray, gram)  # blocks is never empty: tensors merged by blocks have rows


def slerp_blocks(inputs: JobInputs, model_params, params, seed: int) -> Iterator[Block]:
    """slerp from the base (t=0) to the other input: dot product and norms first, then the mix."""
    t = float(params["t"])
    blocks = inputs.row_blocks()

    def base_and_input(rows: slice) -> tuple[Tensor, Tensor]:
        (x,), base = inputs.read(rows)
        assert base is not None  # uses_base: the plan always gives this method a base
        return base, x

    gram = _gram(blocks, base_and_input)
    coef_a, coef_b = slerp_coefficients(t, gram[0, 1], math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1]))
    for rows in blocks:
        (x,), base = inputs.read(rows)
        assert base is not None  # (see above)
        out = base * coef_a
        yield rows, out.add_(x, alpha=coef_b)


def _whole(inputs: JobInputs, fn: TensorFn, model_params, params) -> Iterator[Block]:
    """A tensor the kernel cannot split (its vectors span every row): merged whole, by ``fn``."""
    xs, base = inputs.read(Ellipsis)
    yield Ellipsis, fn(xs, base, model_params, params, None)


def nuslerp_blocks(inputs: JobInputs, model_params, params, seed: int) -> Iterator[Block]:
    """nuslerp: with ``nuslerp_flatten`` one angle for the whole tensor (dot product and norms first);
    without, one per row (rows are independent, so blocks are merged by ``nuslerp`` itself); a
    ``nuslerp_row_wise`` merge (vectors down the columns) is merged whole."""
    if not params["nuslerp_flatten"]:  # one angle per vector
        if params["nuslerp_row_wise"] or len(inputs.shape) < 2:  # vectors down the columns, or one vector
            yield from _whole(inputs, nuslerp, model_params, params)
        else:
            yield from elementwise(nuslerp)(inputs, model_params, params, seed)
        return
    t = nuslerp_t(model_params)
    blocks = inputs.row_blocks()

    def vectors(rows: slice) -> tuple[Tensor, Tensor, Tensor | None]:
        (x0, x1), base = inputs.read(rows)
        if base is None:
            return x0, x1, None
        return x0 - base, x1 - base, base

    gram = torch.from_numpy(_gram(blocks, lambda rows: vectors(rows)[:2]))
    coef0, coef1 = (float(c) for c in nuslerp_coefficients(t, gram[0, 1], gram[0, 0].sqrt(), gram[1, 1].sqrt()))
    for rows in blocks:
        v0, v1, base = vectors(rows)
        out = torch.mul(v0, coef0).add_(v1, alpha=coef1)  # v0 may be a view of the input: not in place
        yield rows, out if base is None else out.add_(base)


def model_stock_blocks(inputs: JobInputs, model_params, params, seed: int) -> Iterator[Block]:
    """Model Stock: the mean pairwise cosine of the task vectors first (whole-tensor, summed over
    blocks in float64), then the interpolation; ``filter_wise`` cosines are per row, so blocks are
    merged by ``model_stock`` itself (1-D tensors, one row, whole)."""
    if params["filter_wise"]:
        if len(inputs.shape) < 2:
            yield from _whole(inputs, model_stock, model_params, params)
        else:
            yield from elementwise(model_stock)(inputs, model_params, params, seed)
        return
    blocks = inputs.row_blocks()
    n = len(inputs.stored)

    def offsets(rows: slice) -> list[Tensor]:
        xs, base = inputs.read(rows)
        assert base is not None  # uses_base: the plan always gives this method a base
        return [x - base for x in xs]

    dots = _gram(blocks, offsets)
    norms = np.sqrt(np.diag(dots))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(min(1.0, max(-1.0, dots[i, j] / max(norms[i] * norms[j], 1e-6))) for i, j in pairs) / len(pairs)
    denominator = 1 + (n - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
    for rows in blocks:
        xs, base = inputs.read(rows)
        assert base is not None  # (see above)
        average = xs[0].clone()
        for x in xs[1:]:
            average.add_(x)
        average.div_(n)
        yield rows, average.mul_(t).add_(base, alpha=1 - t)


# ----------------------------------------------------------------------------------------------
# the task-arithmetic family: per-input sparsification, then element-wise combination


class _Keep:
    """Sparsification of one input's task vector, block by block, once its statistics are known."""

    def apply_(self, delta: Tensor) -> Tensor:
        return delta


class _Drop(_Keep):
    def apply_(self, delta: Tensor) -> Tensor:
        return delta.zero_()


class _KeepLargest(_Keep):
    """Keep entries with ``|delta| > value``, and of those equal to it all but the first ``skip``
    (in index order), then scale by ``factor`` (the L1 rescale, 1 without)."""

    def __init__(self, value: float, skip: int, factor: float):
        self.value, self.skip, self.factor = value, skip, factor
        self.seen = 0

    def apply_(self, delta: Tensor) -> Tensor:
        magnitude = delta.abs()
        if self.seen >= self.skip:  # past the skipped ties: every tie is kept
            keep = magnitude >= self.value
        else:
            keep = magnitude > self.value
            equal = magnitude == self.value
            count = int(torch.count_nonzero(equal))
            if self.seen + count > self.skip:  # the first kept tie is in this block
                index = equal.reshape(-1).nonzero().squeeze(1)
                keep.reshape(-1)[index[self.skip - self.seen :]] = True
            self.seen += count
        delta.mul_(keep)
        if self.factor != 1:
            delta.mul_(self.factor)
        return delta


class _KeepRandom(_Keep):
    """DARE: keep each entry with probability ``density``, masks drawn from one numpy stream per
    (tensor, input); ``restart()`` replays the stream from its start."""

    def __init__(self, seed: int, index: int, density: float):
        self.seed, self.index, self.density = seed, index, density
        self.factor = 1.0
        self.restart()

    def restart(self) -> None:
        self._rng = np.random.default_rng([self.seed, self.index])

    def mask(self, delta: Tensor) -> Tensor:
        drawn = self._rng.random(delta.numel(), dtype=np.float32) < self.density
        return torch.from_numpy(drawn).view(delta.shape).to(delta.device)

    def apply_(self, delta: Tensor) -> Tensor:
        delta.mul_(self.mask(delta))
        if self.factor != 1:
            delta.mul_(self.factor)
        return delta


def _float_bits(magnitude: Tensor) -> Tensor:
    """Bit patterns of non-negative float32 values as int32: ordered like the values."""
    return magnitude.reshape(-1).view(torch.int32)


def _boundary(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries lie in higher bins."""
    from_top = np.cumsum(counts[::-1])
    position = int(np.searchsorted(from_top, k, side="left"))
    bin_ = len(counts) - 1 - position
    return bin_, int(from_top[position] - counts[bin_])


def _rescale_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """``_mask_``'s L1 rescale: restore the L1 norm unless either norm is below ``eps``."""
    return 1.0 if before < eps or after < eps else before / after


class _RadixSelect:
    """Finds the k-th largest of one input's ``|delta|`` entries, exactly, from histograms of their
    float32 bit patterns: 16 high bits over every entry, then 16 low bits inside the boundary bin.

    The low-bit pass usually costs nothing extra: a sample of blocks, histogrammed first, predicts a
    window of high bins around the boundary, and the bit patterns falling in it are kept (a few
    percent of the entries) while the high histogram is being filled. Only if the boundary lands
    outside the window is there a second pass over the tensor.
    """

    def __init__(self, k: int, n: int, rescale: bool):
        self.k, self.n, self.rescale = k, n, rescale
        self.high = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self.high_sums = torch.zeros(HIGH_BINS, dtype=torch.float64)
        self.total = 0.0
        self.seen = 0
        self.window: tuple[int, int] | None = None
        self.kept_bits: list[Tensor] = []

    def add(self, magnitude: Tensor, *, collect: bool) -> None:
        """Histogram one block (and keep its bit patterns inside the window, when ``collect``)."""
        bits = _float_bits(magnitude).cpu()
        key = bits >> 16
        self.high += torch.bincount(key, minlength=HIGH_BINS)
        self.seen += bits.numel()
        if self.rescale:
            self.high_sums += torch.bincount(key, weights=bits.view(torch.float32), minlength=HIGH_BINS)
            self.total += float(bits.view(torch.float32).sum(dtype=torch.float64))
        if collect and self.window is not None:
            lo, hi = self.window
            self.kept_bits.append(bits[(key >= lo) & (key <= hi)])

    def predict_window(self) -> None:
        """From the sample histogrammed so far: the high bins holding ranks ``k/n`` +/- a margin."""
        p = self.k / self.n
        margin = 0.005 + 4 * math.sqrt(p * (1 - p) / max(self.seen, 1))
        counts = self.high.numpy()
        top = max(1, math.floor((p - margin) * self.seen))
        bottom = min(self.seen, math.ceil((p + margin) * self.seen))
        self.window = (_boundary(counts, bottom)[0], _boundary(counts, top)[0])

    def boundary_bin(self) -> tuple[int, int]:
        return _boundary(self.high.numpy(), self.k)

    def window_holds_boundary(self) -> bool:
        return self.window is not None and self.window[0] <= self.boundary_bin()[0] <= self.window[1]

    def selector(self, low: Tensor, low_sums: Tensor) -> _KeepLargest:
        """The keep rule, given the low-bit histogram (and L1 sums) of the boundary bin."""
        high_bin, above_bin = self.boundary_bin()
        low_bin, above_value = _boundary(low.numpy(), self.k - above_bin)
        value = float(np.array([(high_bin << 16) | low_bin], dtype=np.int32).view(np.float32)[0])
        ties = int(low[low_bin])
        kept_ties = self.k - above_bin - above_value
        factor = 1.0
        if self.rescale:
            kept_sum = float(self.high_sums[high_bin + 1 :].sum()) + float(low_sums[low_bin + 1 :].sum())
            factor = _rescale_factor(self.total, kept_sum + kept_ties * value)
        return _KeepLargest(value, ties - kept_ties, factor)


def _low_histogram(bits: Tensor, high_bin: int, rescale: bool) -> tuple[Tensor, Tensor]:
    """Histogram (and sums) of the low 16 bits of the entries of ``bits`` in high bin ``high_bin``."""
    inside = bits[(bits >> 16) == high_bin]
    low = torch.bincount(inside & 0xFFFF, minlength=HIGH_BINS)
    sums = (
        torch.bincount(inside & 0xFFFF, weights=inside.view(torch.float32), minlength=HIGH_BINS).double()
        if rescale
        else torch.zeros(HIGH_BINS, dtype=torch.float64)
    )
    return low, sums


SAMPLE_EVERY = 16
"""TIES: every 16th block is histogrammed first, to predict where the threshold lies."""


def _magnitude_selectors(
    inputs: JobInputs, blocks: list[slice], densities: list[float], rescale: bool, seed: int
) -> list[_Keep]:
    """TIES trimming per input (exact k largest; see ``_RadixSelect``). Not random: ``seed`` unused."""
    n = inputs.numel
    selectors: list[_Keep] = []
    select: dict[int, _RadixSelect] = {}
    for i, density in enumerate(densities):
        if density >= 1:
            selectors.append(_Keep())
        elif density <= 0 or n == 0:
            selectors.append(_Drop())
        else:
            k = max(1, int(density * n))
            selectors.append(_Keep())  # k == n keeps everything (and rescales by exactly 1)
            if k < n:
                select[i] = _RadixSelect(k, n, rescale)
    if not select:
        return selectors

    def histogram(block_list: list[slice], *, collect: bool) -> None:
        for rows in block_list:
            xs, base = inputs.read(rows)
            assert base is not None  # the task-arithmetic family uses_base: the plan always gives it a base
            for i, radix in select.items():
                radix.add(torch.sub(xs[i], base).abs_(), collect=collect)

    sample = blocks[::SAMPLE_EVERY]
    rest = [rows for j, rows in enumerate(blocks) if j % SAMPLE_EVERY]
    histogram(sample, collect=False)
    for radix in select.values():
        radix.predict_window()
    histogram(rest, collect=True)
    # the low bits of the boundary bin: from the kept window (plus the sample, read again), or,
    # when the prediction missed, from a second pass over everything
    complete = all(radix.window_holds_boundary() for radix in select.values())
    low = {i: torch.zeros(HIGH_BINS, dtype=torch.int64) for i in select}
    low_sums = {i: torch.zeros(HIGH_BINS, dtype=torch.float64) for i in select}
    for i, radix in select.items():
        if complete and radix.kept_bits:
            low[i], low_sums[i] = _low_histogram(torch.cat(radix.kept_bits), radix.boundary_bin()[0], rescale)
        radix.kept_bits.clear()
    for rows in sample if complete else blocks:
        xs, base = inputs.read(rows)
        assert base is not None  # (see above)
        for i, radix in select.items():
            bits = _float_bits(torch.sub(xs[i], base).abs_()).cpu()
            counts, sums = _low_histogram(bits, radix.boundary_bin()[0], rescale)
            low[i] += counts
            low_sums[i] += sums
    for i, radix in select.items():
        selectors[i] = radix.selector(low[i], low_sums[i])
    return selectors


def _random_selectors(
    inputs: JobInputs, blocks: list[slice], densities: list[float], rescale: bool, seed: int
) -> list[_Keep]:
    """DARE per input; with ``rescale``, a first pass draws the masks to sum the L1 norms."""
    selectors: list[_Keep] = []
    for i, density in enumerate(densities):
        if density >= 1:
            selectors.append(_Keep())
        elif density <= 0:
            selectors.append(_Drop())
        else:
            selectors.append(_KeepRandom(seed, i, density))
    random = {i: s for i, s in enumerate(selectors) if isinstance(s, _KeepRandom)}
    if rescale and random:
        before = dict.fromkeys(random, 0.0)
        after = dict.fromkeys(random, 0.0)
        for rows in blocks:
            xs, base = inputs.read(rows)
            assert base is not None  # the task-arithmetic family uses_base: the plan always gives it a base
            for i, selector in random.items():
                magnitude = torch.sub(xs[i], base).abs_()
                before[i] += float(magnitude.sum(dtype=torch.float64))
                after[i] += float(magnitude.mul_(selector.mask(magnitude)).sum(dtype=torch.float64))
        for i, selector in random.items():
            selector.factor = _rescale_factor(before[i], after[i])
            selector.restart()
    return selectors


def _keep_all(inputs: JobInputs, blocks: list[slice], densities: list[float], rescale: bool, seed: int) -> list[_Keep]:
    """No sparsification: every task vector is kept whole."""
    return [_Keep() for _ in densities]


Selectors = Callable[[JobInputs, list[slice], list[float], bool, int], list[_Keep]]
"""``selectors(inputs, blocks, densities, rescale, seed)``: one sparsifier per input, after any
passes over the blocks its statistics need."""

SELECTORS: dict[Sparsification | None, Selectors] = {
    None: _keep_all,
    Sparsification.MAGNITUDE: _magnitude_selectors,
    Sparsification.RANDOM: _random_selectors,
}
"""Sparsifications the task-arithmetic kernel can apply block by block; members of the family with
another one (breadcrumbs, della) are merged whole."""


def task_arithmetic_blocks(spec: MethodSpec) -> BlockKernel | None:
    """Block kernel of a member of the generalized task-arithmetic family (``None`` when its
    sparsification has no block selector): sparsifiers per input first, then the element-wise
    combination (``combine_task_vectors``, shared with the whole-tensor function) per block."""
    select = SELECTORS.get(spec.sparsification)
    if select is None:
        return None
    name, consensus = spec.name, spec.consensus

    def kernel(inputs: JobInputs, model_params, params, seed: int) -> Iterator[Block]:
        blocks = inputs.row_blocks()
        weights = [float(p["weight"]) for p in model_params]
        densities = [float(p["density"]) for p in model_params]
        selectors = select(inputs, blocks, densities, bool(params["rescale"]), seed)
        for rows in blocks:
            xs, base = inputs.read(rows)
            assert base is not None  # the task-arithmetic family uses_base: the plan always gives it a base
            if not xs:
                yield rows, base
                continue
            deltas = [selector.apply_(torch.sub(x, base)) for selector, x in zip(selectors, xs)]
            yield rows, combine_task_vectors(deltas, base, weights, params, consensus=consensus, name=name)

    kernel.__name__ = kernel.__qualname__ = f"{name}_blocks"
    return kernel


# ----------------------------------------------------------------------------------------------
# the kernels of the declared methods


KERNELS: dict[Algorithm, Callable[[MethodSpec], BlockKernel | None]] = {
    Algorithm.LINEAR: lambda spec: elementwise(linear),
    Algorithm.PASSTHROUGH: lambda spec: passthrough_blocks,
    Algorithm.SLERP: lambda spec: slerp_blocks,
    Algorithm.NUSLERP: lambda spec: nuslerp_blocks,
    Algorithm.MODEL_STOCK: lambda spec: model_stock_blocks,
    Algorithm.TASK_ARITHMETIC: task_arithmetic_blocks,
}
"""Per algorithm: the block kernel of a declared method, or ``None`` (merged whole). An algorithm
missing here is merged whole too."""


def block_kernel(spec: MethodSpec) -> BlockKernel | None:
    """The block kernel of a declared method, or ``None`` when it is always merged whole."""
    make = KERNELS.get(spec.algorithm)
    return make(spec) if make is not None else None


BLOCK_KERNELS: dict[str, BlockKernel] = {
    name: kernel for name, spec in SPECS.items() if (kernel := block_kernel(spec)) is not None
}
"""Methods merged block-wise for large tensors; the others are always merged whole."""

"""Merge methods, declared once: names, parameters and defaults, inputs, and what each one computes.

Torch-free on purpose: the recipe schema validates against this table, and so do the search space
and the commands that only read or write recipes (``front``, ``export``), which should not pay for
importing torch. The merge engine turns each declaration into its whole-tensor function
(``evomerge.merge.methods.METHODS``) and, where the algorithm has one, its block kernel
(``evomerge.merge.blocks.BLOCK_KERNELS``); no other module lists methods.

Names, parameters, defaults and input contracts are mergekit's (0.1.5); tests/test_methods.py holds
every entry to mergekit's registry.

Adding a method is one entry in ``SPECS``. A new member of the generalized task-arithmetic family
(another combination of sparsification, consensus and defaults) needs nothing else: its
parameters, randomness, whole-tensor function and block kernel all follow from the entry. A new
sparsification or algorithm also needs its implementation in ``evomerge/merge/methods.py`` (and,
for large tensors to be merged block-wise, in ``evomerge/merge/blocks.py``); the engine refuses to
import while a declared algorithm has no implementation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

REQUIRED: Any = object()
"""Marks a parameter that has no default: a recipe must set it."""


class Algorithm(StrEnum):
    """The computation a method runs; the engine has one implementation per algorithm."""

    LINEAR = "linear"
    PASSTHROUGH = "passthrough"
    SLERP = "slerp"
    NUSLERP = "nuslerp"
    MODEL_STOCK = "model_stock"
    TASK_ARITHMETIC = "task_arithmetic"
    """mergekit's GeneralizedTaskArithmeticMerge: per input a task vector ``x - base``, sparsified,
    weighted; optionally a sign election; summed (and normalized), scaled, added to the base."""
    FISHER = "fisher"
    """Fisher-weighted averaging (Matena & Raffel 2022): per entry, inputs weighted by their diagonal Fisher."""
    REGMEAN = "regmean"
    """RegMean (Jin et al. 2023): per linear layer, the weights that best reproduce every input's outputs on
    its own inputs (a closed form in the layers' input Gram matrices); other tensors averaged."""


class Statistic(StrEnum):
    """Data a data-aware method reads per input model, computed from a recipe's ``data:`` items."""

    FISHER = "fisher"
    """The diagonal of the empirical Fisher: per parameter, the mean over items of the squared gradient
    of the item's log-likelihood (its reference continuation, or its gold choice), scaled to unit norm
    over the model's parameters."""
    GRAM = "gram"
    """Per linear layer (``*.weight`` of an ``nn.Linear``), the Gram matrix ``X^T X / n`` of its inputs
    over the items' tokens."""


class Sparsification(StrEnum):
    """How the task-arithmetic family thins each task vector (mergekit's ``SparsificationMethod``)."""

    MAGNITUDE = "magnitude"
    """TIES trimming: keep the ``density`` share of entries largest in magnitude."""
    RANDOM = "random"
    """DARE: keep each entry with probability ``density``."""
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    """Model Breadcrumbs: drop the ``gamma`` share of largest entries, then the smallest."""
    DELLA = "della"
    """DELLA MagPrune: keep with a probability that grows with the entry's magnitude rank."""


class Consensus(StrEnum):
    """How the task-arithmetic family elects a sign per entry (mergekit's ``ConsensusMethod``)."""

    SUM = "sum"
    """The sign of the summed weighted task vectors (TIES)."""
    COUNT = "count"
    """The majority of the inputs' signs."""


SPARSIFICATION_PARAMS: dict[Sparsification, dict[str, Any]] = {
    Sparsification.MAGNITUDE_OUTLIERS: {"gamma": 0.01},
    Sparsification.DELLA: {"epsilon": 0.15},
}
"""Per-input parameters a sparsification adds to ``weight`` and ``density``, with their defaults."""

RANDOMIZED_SPARSIFICATIONS = frozenset({Sparsification.RANDOM, Sparsification.DELLA})
"""Sparsifications that draw random numbers (the merge needs a seed)."""

OptionalTensorPolicy = Literal["error", "passthrough_singleton", "base_or_skip"]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """What a recipe, the search space and the engine need to know about a method besides its code."""

    name: str
    algorithm: Algorithm
    summary: str = ""
    """One line: what the method does (docstring of its whole-tensor function)."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Global parameters and their defaults (``REQUIRED`` for none)."""
    model_params: Mapping[str, Any] = field(default_factory=dict)
    """Per-input parameters and their defaults (``REQUIRED`` for none). Never bound for the base
    when the base is a distinguished input."""
    uses_base: bool = False
    """The base model is a distinguished input (``base``), required by the method."""
    optional_base: bool = False
    """The base model, when a recipe names one, is a distinguished input (``base``, not in
    ``tensors``); without one the method still runs (``base=None``). Only nuslerp."""
    min_inputs: int = 1
    max_inputs: int | None = None
    """Bounds on the number of inputs (base excluded when it is a distinguished input)."""
    randomized: bool = False
    """The method draws random numbers: merges take a seed."""
    optional_tensor_policy: OptionalTensorPolicy = "error"
    """mergekit's handling of an *optional* weight (e.g. ``lm_head`` of a tied model) that only
    some inputs have: ``"error"``; ``"passthrough_singleton"`` (exactly one input has it: copy
    that one); ``"base_or_skip"`` (fewer inputs than the method needs: copy the base's if only the
    base has it, else leave the tensor out)."""
    sparsification: Sparsification | None = None
    """Task-arithmetic family only: how each task vector is thinned (``None``: kept whole)."""
    consensus: Consensus | None = None
    """Task-arithmetic family only: the sign election (``None``: plain weighted sum)."""
    statistic: Statistic | None = None
    """Data-aware methods only: what they read per input model besides its weights (computed from the
    recipe's ``data:`` section). mergekit has no such method: their recipes run in evomerge only."""

    def check_inputs(self, count: int, has_base: bool) -> None:
        """Raise ``ValueError`` unless ``count`` inputs (base excluded) and ``has_base`` suit the method."""
        check_count(self.name, count, self.min_inputs, self.max_inputs)
        if self.uses_base and not has_base:
            raise ValueError(f"{self.name}: needs a base model (base_model)")
        if has_base and not (self.uses_base or self.optional_base):
            raise ValueError(f"{self.name}: takes no distinguished base tensor; pass the base as an input")

    def bind(
        self, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Fill defaults into (params, model_params); unknown or missing required names raise."""

        def fill(given: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
            unknown = set(given) - set(defaults)
            if unknown:
                raise ValueError(f"{self.name}: unknown {where} parameter(s): {', '.join(sorted(unknown))}")
            out = {key: given.get(key, default) for key, default in defaults.items()}
            missing = [key for key, value in out.items() if value is REQUIRED]
            if missing:
                raise ValueError(f"{self.name}: required {where} parameter(s) not set: {', '.join(missing)}")
            return out

        return fill(params, self.params, "global"), [fill(p, self.model_params, "per-model") for p in model_params]


def check_count(name: str, count: int, lo: int, hi: int | None) -> None:
    """Raise ``ValueError`` unless ``lo <= count <= hi`` (``hi=None``: no upper bound); shared by the
    declarations and the engine's tensor checks, so both word the error alike."""
    if count < lo or (hi is not None and count > hi):
        if hi == lo:
            want = f"exactly {lo}"
        elif hi is None:
            want = f"at least {lo}"
        else:
            want = f"{lo} to {hi}"
        raise ValueError(f"{name}: takes {want} input tensor(s) besides any base, got {count}")


def task_arithmetic_family(
    name: str,
    summary: str,
    *,
    sparsification: Sparsification | None,
    consensus: Consensus | None,
    normalize: bool,
    rescale: bool,
) -> MethodSpec:
    """A member of the generalized task-arithmetic family; everything but its sparsification,
    consensus and two defaults is shared: ``weight`` (required) and ``density`` per input (plus the
    sparsification's own, ``SPARSIFICATION_PARAMS``), ``int8_mask``, ``normalize``, ``rescale``
    and ``lambda`` shared, a required base and any number of other inputs."""
    own = SPARSIFICATION_PARAMS.get(sparsification, {}) if sparsification is not None else {}
    return MethodSpec(
        name=name,
        algorithm=Algorithm.TASK_ARITHMETIC,
        summary=summary,
        params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        model_params={"weight": REQUIRED, "density": 1.0, **own},
        uses_base=True,
        min_inputs=0,
        randomized=sparsification in RANDOMIZED_SPARSIFICATIONS,
        sparsification=sparsification,
        consensus=consensus,
    )


def _by_name(*specs: MethodSpec) -> dict[str, MethodSpec]:
    table: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.name in table:
            raise ValueError(f"merge method {spec.name!r} is declared twice")
        table[spec.name] = spec
    return table


_magnitude, _random = Sparsification.MAGNITUDE, Sparsification.RANDOM
_outliers, _della = Sparsification.MAGNITUDE_OUTLIERS, Sparsification.DELLA
_sum = Consensus.SUM

SPECS: dict[str, MethodSpec] = _by_name(
    MethodSpec(
        name="linear",
        algorithm=Algorithm.LINEAR,
        summary="Weighted average of the inputs (weighted sum with normalize: false).",
        params={"normalize": True},
        model_params={"weight": REQUIRED},
    ),
    MethodSpec(
        name="slerp",
        algorithm=Algorithm.SLERP,
        summary="Spherical interpolation from the base (t=0) to the one other input (t=1).",
        params={"t": REQUIRED},
        uses_base=True,
        min_inputs=1,
        max_inputs=1,
        optional_tensor_policy="passthrough_singleton",
    ),
    MethodSpec(
        name="nuslerp",
        algorithm=Algorithm.NUSLERP,
        summary="Slerp of two inputs at t = weight[1] / (weight[0] + weight[1]); with a base, of their task vectors.",
        params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
        model_params={"weight": REQUIRED},
        optional_base=True,
        min_inputs=2,
        max_inputs=2,
        optional_tensor_policy="passthrough_singleton",
    ),
    MethodSpec(
        name="model_stock",
        algorithm=Algorithm.MODEL_STOCK,
        summary="Model Stock: from the base toward the inputs' average, by the task vectors' mean cosine.",
        params={"filter_wise": False},
        uses_base=True,
        min_inputs=2,
        optional_tensor_policy="base_or_skip",
    ),
    MethodSpec(
        name="passthrough",
        algorithm=Algorithm.PASSTHROUGH,
        summary="The single input, times its scale when set.",
        model_params={"scale": None},
        min_inputs=1,
        max_inputs=1,
    ),
    # the generalized task-arithmetic family: (sparsification, consensus) and the two defaults
    # that differ between members, as in mergekit's registry
    task_arithmetic_family(
        "task_arithmetic",
        "Task Arithmetic: base + sum of weighted task vectors.",
        sparsification=None,
        consensus=None,
        normalize=False,
        rescale=False,
    ),
    task_arithmetic_family(
        "ties",
        "TIES: magnitude trimming and sign consensus.",
        sparsification=_magnitude,
        consensus=_sum,
        normalize=True,
        rescale=False,
    ),
    task_arithmetic_family(
        "dare_ties",
        "DARE (random drop) with TIES sign consensus.",
        sparsification=_random,
        consensus=_sum,
        normalize=False,
        rescale=True,
    ),
    task_arithmetic_family(
        "dare_linear",
        "DARE (random drop), linear combination.",
        sparsification=_random,
        consensus=None,
        normalize=False,
        rescale=True,
    ),
    task_arithmetic_family(
        "breadcrumbs",
        "Model Breadcrumbs: drop the largest outliers and the smallest entries.",
        sparsification=_outliers,
        consensus=None,
        normalize=False,
        rescale=False,
    ),
    task_arithmetic_family(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES sign consensus.",
        sparsification=_outliers,
        consensus=_sum,
        normalize=False,
        rescale=False,
    ),
    task_arithmetic_family(
        "della",
        "DELLA: magnitude-ranked random drop with TIES sign consensus.",
        sparsification=_della,
        consensus=_sum,
        normalize=True,
        rescale=True,
    ),
    task_arithmetic_family(
        "della_linear",
        "DELLA, linear combination.",
        sparsification=_della,
        consensus=None,
        normalize=False,
        rescale=True,
    ),
    # data-aware methods (evomerge's own: no mergekit equivalent)
    MethodSpec(
        name="fisher",
        algorithm=Algorithm.FISHER,
        summary="Fisher merging: per entry, the inputs averaged with weights weight * (Fisher + fisher_floor).",
        params={"fisher_floor": 1e-6},
        model_params={"weight": 1.0},
        min_inputs=1,
        statistic=Statistic.FISHER,
    ),
    MethodSpec(
        name="regmean",
        algorithm=Algorithm.REGMEAN,
        summary="RegMean: linear layers solved from the inputs' Gram matrices (off-diagonals times alpha); the rest averaged.",
        params={"alpha": 0.9},
        model_params={"weight": 1.0},
        min_inputs=1,
        statistic=Statistic.GRAM,
    ),
)
"""The registry: method name -> declaration. Names and parameters are mergekit's, but for the
data-aware methods (``statistic`` set), which mergekit does not have."""

MERGEKIT_METHODS = frozenset(name for name, spec in SPECS.items() if spec.statistic is None)
"""Methods mergekit runs too (a recipe of one of them is a mergekit recipe)."""

del _magnitude, _random, _outliers, _della, _sum


def unknown_method(name: str) -> ValueError:
    """The error for a method name not in ``SPECS``, listing the valid names."""
    valid = ", ".join(sorted(SPECS))
    return ValueError(f"merge_method: unknown method {name!r}; valid methods: {valid}")


def get_method(name: str) -> MethodSpec:
    """Look a method's declaration up by name, with an error that lists the valid names."""
    try:
        return SPECS[name]
    except KeyError:
        raise unknown_method(name) from None


BOOL_PARAMS = frozenset(
    key
    for spec in SPECS.values()
    for key, default in (*spec.params.items(), *spec.model_params.items())
    if isinstance(default, bool)
)
"""Parameters that take true/false (those whose declared default is a bool)."""

PARAM_RANGES: dict[str, tuple[float, float]] = {
    "t": (0.0, 1.0),
    "density": (0.0, 1.0),
    "gamma": (0.0, 1.0),
    "epsilon": (0.0, 1.0),
    "alpha": (0.0, 1.0),
    "fisher_floor": (0.0, math.inf),
}
"""Closed ranges of bounded numeric parameters; the others (weight, lambda, scale) take any finite value."""

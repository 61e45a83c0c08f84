"""Merge-method kernels, held to mergekit's own kernels at tensor level.

mergekit's ``merge_tensors(tensors, method, parameters=..., base_index=...)`` runs a registered
method on one group of tensors: the least brittle way into its kernels. Per-model parameters go
to it as lists in input order (base excluded for base-aware methods).
"""

from __future__ import annotations

import pytest
import torch

import evomerge.merge.methods as methods
from evomerge.merge.methods import METHODS, REQUIRED, della_probabilities, get_method
from evomerge.recipe import MERGEKIT_METHODS

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope  # noqa: E402

TOL = 1e-5


def _family(shape: tuple[int, ...], seed: int, n: int = 3, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + noise * torch.randn(shape, generator=g) for _ in range(n)]


SHAPES = {"weight": (24, 20), "norm": (20,)}
FAMILIES = {kind: _family(shape, seed) for seed, (kind, shape) in enumerate(SHAPES.items())}


def ours(name, inputs, base, params=None, model_params=None, generator=None):
    spec = get_method(name)
    params, model_params = spec.bind(params or {}, model_params or [{} for _ in inputs])
    return spec.fn(list(inputs), base, model_params, params, generator)


def theirs(name, inputs, base, params=None, model_params=None):
    """mergekit's output; ``base`` (if any) goes first and is marked as the base."""
    parameters = dict(params or {})
    for key in {k for mp in model_params or [] for k in mp}:
        parameters[key] = [mp[key] for mp in model_params]
    tensors = ([base] if base is not None else []) + list(inputs)
    return mergekit_methods.merge_tensors(
        tensors, name, parameters=parameters, base_index=0 if base is not None else None
    )


def _per_model(n, **values):
    """``n`` per-model dicts; a list value gives one entry per model, a scalar broadcasts."""
    return [{k: (v[i] if isinstance(v, list) else v) for k, v in values.items()} for i in range(n)]


W3 = [0.6, 0.3, -0.25]

# (method, global params, per-model params for 3 inputs (or 1/2), number of inputs, pass the base)
DETERMINISTIC = (
    [
        ("linear", {}, _per_model(3, weight=W3), 3, False),
        ("linear", {"normalize": False}, _per_model(3, weight=W3), 3, False),
        ("task_arithmetic", {}, _per_model(3, weight=W3), 3, True),
        ("task_arithmetic", {"normalize": True, "lambda": 0.7}, _per_model(3, weight=W3), 3, True),
        ("ties", {}, _per_model(3, weight=W3, density=0.5), 3, True),
        ("ties", {"rescale": True, "int8_mask": True}, _per_model(3, weight=W3, density=[0.3, 0.5, 0.8]), 3, True),
        ("ties", {"normalize": False, "lambda": 1.5}, _per_model(3, weight=W3, density=1.0), 3, True),
        ("breadcrumbs", {}, _per_model(3, weight=W3, density=0.7, gamma=0.05), 3, True),
        ("breadcrumbs", {"rescale": True}, _per_model(3, weight=W3, density=0.9, gamma=0.2), 3, True),
        ("breadcrumbs_ties", {"normalize": True}, _per_model(3, weight=W3, density=0.6, gamma=0.1), 3, True),
        ("model_stock", {}, _per_model(3), 3, True),
        ("model_stock", {"filter_wise": True}, _per_model(3), 3, True),
        ("model_stock", {}, _per_model(2), 2, True),
        ("slerp", {"t": 0.3}, _per_model(1), 1, True),
        ("slerp", {"t": 0.85}, _per_model(1), 1, True),
        ("passthrough", {}, _per_model(1), 1, False),
        ("passthrough", {}, _per_model(1, scale=-1.5), 1, False),
    ]
    + [
        (
            "nuslerp",
            {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
            _per_model(2, weight=[1.0, 3.0]),
            2,
            with_base,
        )
        for with_base in (True, False)
        for flatten in (True, False)
        for row_wise in (True, False)
    ]
    + [
        ("nuslerp", {}, _per_model(2, weight=[0.5, -0.5]), 2, True),  # weights sum to 0: t = 0.5
    ]
)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize(
    "name,params,model_params,n,with_base",
    DETERMINISTIC,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(DETERMINISTIC)],
)
def test_matches_mergekit(kind, name, params, model_params, n, with_base):
    base, inputs = FAMILIES[kind]
    inputs = inputs[:n]
    snapshot = [t.clone() for t in [base, *inputs]]
    got = ours(name, inputs, base if with_base else None, params, model_params)
    want = theirs(name, inputs, base if with_base else None, params, model_params)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    for before, after in zip(snapshot, [base, *inputs]):
        assert torch.equal(before, after), "inputs were modified"


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_large_tensor_selection_path_matches_mergekit(monkeypatch, name):
    """Above EXACT_SORT_MAX_NUMEL selection uses kthvalue; without ties it keeps the same entries."""
    monkeypatch.setattr(methods, "EXACT_SORT_MAX_NUMEL", 0)
    base, inputs = FAMILIES["weight"]
    extra = {"gamma": 0.05} if "breadcrumbs" in name else {}
    mp = _per_model(3, weight=W3, density=[0.2, 0.55, 0.9], **extra)
    for params in ({}, {"rescale": True}):
        got = ours(name, inputs, base, params, mp)
        want = theirs(name, inputs, base, params, mp)
        assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["ties", "breadcrumbs"])
def test_selection_with_magnitude_ties(monkeypatch, name):
    """Quantized task vectors (many equal |delta|): the sort path matches mergekit exactly; the
    kthvalue path still keeps exactly mergekit's count of entries, ties broken by index."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(30, 20, generator=g)
    delta = torch.randint(-3, 4, (30, 20), generator=g).float() * 0.25
    extra = {"gamma": 0.1} if name == "breadcrumbs" else {}
    mp = [{"weight": 1.0, "density": 0.45, **extra}]
    params = {"normalize": False}
    want = theirs(name, [base + delta], base, params, mp)
    assert (ours(name, [base + delta], base, params, mp) - want).abs().max().item() <= TOL
    monkeypatch.setattr(methods, "EXACT_SORT_MAX_NUMEL", 0)
    got = ours(name, [base + delta], base, params, mp)
    assert int(((got - base) != 0).sum()) == int(((want - base) != 0).sum())


def test_rank_range_mask_is_a_stable_rank_window():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        values = torch.randint(0, int(torch.randint(1, 6, (1,), generator=g)), (n,), generator=g).float()
        lo = int(torch.randint(-2, n + 2, (1,), generator=g))
        hi = int(torch.randint(-2, n + 3, (1,), generator=g))
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(values, stable=True).indices[max(lo, 0) : max(min(hi, n), 0)]] = True
        assert torch.equal(methods._rank_range_mask(values, lo, hi), want)


# ------------------------------------------------------------------------------------------------
# randomized methods

RANDOMIZED = {
    "dare_ties": {},
    "dare_linear": {},
    "della": {"epsilon": 0.1},
    "della_linear": {"epsilon": 0.1},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(RANDOMIZED))
def test_randomized_seeding(name):
    base, inputs = FAMILIES["weight"]
    mp = _per_model(3, weight=W3, density=0.5, **RANDOMIZED[name])
    first = ours(name, inputs, base, {}, mp, _gen(1))
    assert torch.equal(first, ours(name, inputs, base, {}, mp, _gen(1)))
    assert not torch.equal(first, ours(name, inputs, base, {}, mp, _gen(2)))
    with pytest.raises(ValueError, match="Generator"):
        ours(name, inputs, base, {}, mp, None)
    # density 1 draws nothing: a plain task arithmetic (della normalizes by default)
    dense = _per_model(3, weight=W3, density=1.0, **RANDOMIZED[name])
    assert torch.equal(ours(name, inputs, base, {}, dense, None), ours(name, inputs, base, {}, dense, _gen(3)))


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("name", list(RANDOMIZED))
def test_randomized_match_mergekit_on_cpu_with_same_seed(kind, name):
    """mergekit draws from the global RNG. Our draws are the same torch calls in the same order, so
    on CPU a generator seeded like the global RNG reproduces mergekit (not promised, but it holds
    for the pinned torch, and it pins down density, rescaling and della's probabilities)."""
    base, inputs = FAMILIES[kind]
    mp = _per_model(3, weight=W3, density=[0.4, 0.5, 0.7], **RANDOMIZED[name])
    for params in ({}, {"rescale": False, "normalize": True}):
        got = ours(name, inputs, base, params, mp, _gen(11))
        torch.manual_seed(11)
        want = theirs(name, inputs, base, params, mp)
        assert (got - want).abs().max().item() <= TOL


def test_dare_kept_fraction_and_rescale():
    g = _gen(5)
    base = torch.randn(300, 400, generator=g)
    x = base + torch.randn(300, 400, generator=g)
    delta = x - base
    n = delta.numel()
    for density in (0.1, 0.3, 0.7):
        plain = ours("dare_linear", [x], base, {"rescale": False}, [{"weight": 1.0, "density": density}], _gen(9))
        kept = plain - base != 0
        sigma = (density * (1 - density) / n) ** 0.5
        assert abs(kept.float().mean().item() - density) < 6 * sigma
        assert torch.allclose((plain - base)[kept], delta[kept], atol=1e-5)
        # rescale (the default): kept entries scaled by one factor restoring the L1 norm, ~1/density
        scaled = ours("dare_linear", [x], base, {}, [{"weight": 1.0, "density": density}], _gen(9))
        assert torch.equal(scaled - base != 0, kept)
        factor = delta.abs().sum() / delta[kept].abs().sum()
        assert torch.allclose((scaled - base)[kept], delta[kept] * factor, rtol=1e-4, atol=1e-5)
        assert abs(factor.item() * density - 1) < 0.05


def test_della_probabilities_and_kept_fraction():
    g = _gen(6)
    delta = torch.randn(64, 2000, generator=g)
    density, epsilon = 0.4, 0.15
    probs = della_probabilities(delta, density, epsilon)
    assert probs.shape == delta.shape
    assert torch.allclose(probs.min(dim=1).values, torch.full((64,), density - epsilon))
    assert torch.allclose(probs.max(dim=1).values, torch.full((64,), density + epsilon))
    assert torch.allclose(probs.mean(dim=1), torch.full((64,), density), atol=1e-5)
    # monotone in magnitude within each row
    order = delta.abs().argsort(dim=1)
    assert (probs.gather(1, order).diff(dim=1) > 0).all()
    # 1-D: one row
    assert della_probabilities(delta[0], density, epsilon).shape == (1, 2000)
    # empirical: the smallest tenth kept ~ density - 0.9 eps, the largest ~ density + 0.9 eps
    base = torch.zeros_like(delta)
    mp = [{"weight": 1.0, "density": density, "epsilon": epsilon}]
    out = ours("della_linear", [delta], base, {"rescale": False}, mp, _gen(4))
    kept = (out != 0).gather(1, order).float()
    low, high = kept[:, :200].mean().item(), kept[:, -200:].mean().item()
    sigma = (0.5 * 0.5 / (64 * 200)) ** 0.5
    assert abs(low - (density - 0.9 * epsilon)) < 6 * sigma
    assert abs(high - (density + 0.9 * epsilon)) < 6 * sigma
    assert abs((out != 0).float().mean().item() - density) < 0.01


def test_della_epsilon_bounds():
    base, inputs = FAMILIES["weight"]
    with pytest.raises(ValueError, match="epsilon"):
        ours("della", inputs, base, {}, _per_model(3, weight=1.0, density=0.1, epsilon=0.15), _gen(0))
    # density 0 drops everything without checking epsilon (as mergekit)
    out = ours("della_linear", inputs, base, {}, _per_model(3, weight=1.0, density=0.0), _gen(0))
    assert torch.equal(out, base)


# ------------------------------------------------------------------------------------------------
# edge cases


def test_slerp_endpoints_and_colinear_fallback():
    base, (other, *_) = FAMILIES["weight"]
    assert torch.equal(ours("slerp", [other], base, {"t": 0.0}), base)
    assert torch.equal(ours("slerp", [other], base, {"t": 1.0}), other)
    doubled = 2 * base  # colinear: linear interpolation
    got = ours("slerp", [doubled], base, {"t": 0.25})
    assert torch.allclose(got, 0.75 * base + 0.25 * doubled, atol=1e-6)
    assert (got - theirs("slerp", [doubled], base, {"t": 0.25})).abs().max().item() <= TOL
    zero = torch.zeros_like(base)  # zero norm counts as 1: no nan
    assert torch.isfinite(ours("slerp", [zero], base, {"t": 0.5})).all()


def test_passthrough_scale_and_alias():
    _, (x, *_) = FAMILIES["norm"]
    assert ours("passthrough", [x], None) is x
    assert torch.equal(ours("passthrough", [x], None, {}, [{"scale": 0.5}]), x * 0.5)


def test_weights_summing_to_zero():
    base, inputs = FAMILIES["weight"]
    mp = _per_model(2, weight=[0.5, -0.5])
    # task arithmetic / linear-family normalize guards |sum| < 1e-8 by dividing by 1
    for name in ("task_arithmetic", "dare_linear", "breadcrumbs"):
        extra = {"density": 1.0}
        params = {"normalize": True}
        got = ours(name, inputs[:2], base, params, [dict(m, **extra) for m in mp], _gen(0))
        want = theirs(name, inputs[:2], base, params, [dict(m, **extra) for m in mp])
        assert (got - want).abs().max().item() <= TOL
        assert torch.allclose(got, base + 0.5 * (inputs[0] - inputs[1]), atol=1e-5)
    # linear has no guard in mergekit: 0/0 -> non-finite, mirrored
    got = ours("linear", inputs[:2], None, {}, mp)
    want = theirs("linear", inputs[:2], None, {}, mp)
    assert not torch.isfinite(got).all() and not torch.isfinite(want).all()


def test_consensus_removing_everything_keeps_base():
    base, _ = FAMILIES["weight"]
    for name in ("ties", "breadcrumbs_ties", "della"):
        mp = _per_model(2, weight=1.0, density=0.5, epsilon=0.1, gamma=0.01)
        mp = [{k: v for k, v in m.items() if k in METHODS[name].model_params} for m in mp]
        got = ours(name, [base.clone(), base.clone()], base, {}, mp, _gen(0))
        assert torch.equal(got, base)
    assert ours("ties", [], base, {}, []) is base  # no inputs besides the base


def test_ties_sign_election_by_sum():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])
    b = torch.tensor([-3.0, 2.0, -1.0, 0.0])
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    got = ours("ties", [a, b], base, {"normalize": True}, mp)
    assert torch.equal(got, torch.tensor([-3.0, 2.0, 2.0, 0.0]))
    assert torch.equal(got, theirs("ties", [a, b], base, {"normalize": True}, mp))


def test_float64_in_float64_out():
    base, inputs = FAMILIES["weight"]
    base, inputs = base.double(), [x.double() for x in inputs]
    for name, params, mp, n, with_base in DETERMINISTIC[::3]:
        assert ours(name, inputs[:n], base if with_base else None, params, mp).dtype == torch.float64
    for name, extra in RANDOMIZED.items():
        mp = _per_model(3, weight=W3, density=0.5, **extra)
        assert ours(name, inputs, base, {}, mp, _gen(0)).dtype == torch.float64


def test_non_floating_inputs_raise_type_error():
    ints = [torch.arange(6).reshape(2, 3) for _ in range(3)]
    for _name, spec in METHODS.items():
        n = max(spec.min_inputs, 1) if spec.max_inputs is None else spec.max_inputs
        base = ints[0] if spec.uses_base else None
        mp = [{k: (1.0 if v is REQUIRED else v) for k, v in spec.model_params.items()} for _ in range(n)]
        params = {k: (0.5 if v is REQUIRED else v) for k, v in spec.params.items()}
        with pytest.raises(TypeError, match="floating"):
            spec.fn(ints[1 : 1 + n] if base is not None else ints[:n], base, mp, params, _gen(0))


@pytest.mark.parametrize("name", list(METHODS))
def test_wrong_input_counts_raise(name):
    spec = METHODS[name]
    base, inputs = FAMILIES["norm"]
    inputs = inputs + [inputs[0] * 0.9]
    mp_one = {k: (1.0 if v is REQUIRED else v) for k, v in spec.model_params.items()}
    params = {k: (0.5 if v is REQUIRED else v) for k, v in spec.params.items()}
    with_base = base if spec.uses_base or spec.optional_base else None
    counts = []
    if spec.max_inputs is not None:
        counts.append(spec.max_inputs + 1)
    if spec.min_inputs > 0:
        counts.append(spec.min_inputs - 1)
    for n in counts:
        with pytest.raises(ValueError, match="input"):
            spec.fn(inputs[:n], with_base, [mp_one] * n, params, _gen(0))
        with pytest.raises(ValueError):
            spec.check_inputs(n, with_base is not None)
    n = max(spec.min_inputs, 1)
    if spec.uses_base:
        with pytest.raises(ValueError, match="base"):
            spec.fn(inputs[:n], None, [mp_one] * n, params, _gen(0))
    if not (spec.uses_base or spec.optional_base):
        with pytest.raises(ValueError, match="base"):
            spec.fn(inputs[:n], base, [mp_one] * n, params, _gen(0))
    with pytest.raises(ValueError, match="model_params"):
        spec.fn(inputs[:n], with_base, [mp_one] * (n + 1), params, _gen(0))


def test_bind_and_get_method():
    spec = get_method("ties")
    params, mp = spec.bind({"lambda": 2.0}, [{"weight": 1.0}])
    assert params == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 2.0}
    assert mp == [{"weight": 1.0, "density": 1.0}]
    with pytest.raises(ValueError, match="weight"):
        spec.bind({}, [{}])
    with pytest.raises(ValueError, match="unknown"):
        spec.bind({"t": 1}, [{"weight": 1.0}])
    with pytest.raises(ValueError, match="valid methods"):
        get_method("frankenmerge")


# ------------------------------------------------------------------------------------------------
# the registry against mergekit's


def test_data_aware_methods_are_the_ones_mergekit_lacks():
    ours_only = [name for name in METHODS if name not in MERGEKIT_METHODS]
    assert ours_only == ["fisher", "regmean"]
    for name in ours_only:
        assert METHODS[name].statistic is not None
        with pytest.raises(RuntimeError, match="Unimplemented"):
            mergekit_methods.get(name)


@pytest.mark.parametrize("name", [name for name in METHODS if name in MERGEKIT_METHODS])
def test_spec_matches_mergekit_spec(name):
    ours_spec = METHODS[name]
    spec = mergekit_methods.get(name).spec
    shared = {p.name: (REQUIRED if p.default is MISSING else p.default) for p in spec.shared_parameters}
    per_input = {p.name: (REQUIRED if p.default is MISSING else p.default) for p in spec.input_parameters}
    assert dict(ours_spec.params) == shared
    assert dict(ours_spec.model_params) == per_input
    contract = spec.contract
    assert ours_spec.uses_base == (contract.base == BasePolicy.REQUIRED)
    assert ours_spec.optional_base == (contract.base == BasePolicy.OPTIONAL)
    if any(p.scope == ParameterScope.NON_BASE for p in spec.input_parameters):
        assert ours_spec.uses_base or ours_spec.optional_base
    # counts: ours exclude a distinguished base; mergekit's min/max_inputs include it
    has_base = int(ours_spec.uses_base)
    lo = max(contract.min_inputs - has_base, contract.min_non_base or 0)
    hi = contract.max_inputs - has_base if contract.max_inputs is not None else contract.max_non_base
    assert (ours_spec.min_inputs, ours_spec.max_inputs) == (lo, hi)
    assert ours_spec.optional_tensor_policy == spec.optional_tensor_policy.value
    assert ours_spec.randomized == name.startswith(("dare", "della"))

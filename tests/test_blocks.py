"""Block-wise merging (``merge/blocks.py``) against the whole-tensor methods, and through the engine."""

from __future__ import annotations

import pytest
import torch
from test_engine import load_all

from evomerge.merge import blocks, engine, methods
from evomerge.merge.blocks import BLOCK_KERNELS, JobInputs
from evomerge.merge.engine import materialize_into, merge_to_disk, plan_recipe
from evomerge.recipe import Recipe


def _family(shape=(96, 250), n=3, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if ties:  # deltas on a coarse grid: many exactly equal magnitudes, across block boundaries
        inputs = [base + torch.randint(-4, 5, shape, generator=g).float() / 8 for _ in range(n)]
    else:
        inputs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return inputs, base


def _run_blocks(method, inputs, base, model_params, params, *, seed=0, block_elements=1000):
    spec = methods.get_method(method)
    params, model_params = spec.bind(params, model_params)
    job = JobInputs(
        inputs, base if spec.uses_base else None, dtype=torch.float32, device="cpu", block_elements=block_elements
    )
    pieces = list(BLOCK_KERNELS[method](job, model_params, params, seed))
    assert len(pieces) > 1, "the test should span several blocks"
    assert [p[0].start for p in pieces] == sorted(p[0].start for p in pieces)
    return torch.cat([piece for _, piece in pieces])


def _run_whole(method, inputs, base, model_params, params, generator=None):
    spec = methods.get_method(method)
    params, model_params = spec.bind(params, model_params)
    return spec.fn(inputs, base if spec.uses_base else None, model_params, params, generator)


@pytest.fixture
def kthvalue_selection(monkeypatch):
    """Whole-tensor TIES on the same exact-count, ties-by-index selection the blocks implement."""
    monkeypatch.setattr(methods, "EXACT_SORT_MAX_NUMEL", 0)


CASES = [
    ("linear", [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.9}], {}),
    ("linear", [{"weight": 1.0}, {"weight": 2.0}, {"weight": -0.5}], {"normalize": False}),
    ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.4}, {"weight": 1.1}], {}),
    ("ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.75}, {"weight": 1.0, "density": 1.0}], {}),
    (
        "ties",
        [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.0}, {"weight": 0.3, "density": 0.01}],
        {"normalize": False, "lambda": 1.5},
    ),
]


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "tied-magnitudes"])
@pytest.mark.parametrize(("method", "model_params", "params"), CASES)
def test_deterministic_blocks_equal_whole(kthvalue_selection, method, model_params, params, ties) -> None:
    inputs, base = _family(ties=ties)
    whole = _run_whole(method, inputs, base, model_params, params)
    assert torch.equal(_run_blocks(method, inputs, base, model_params, params), whole)


def test_ties_rescale_blocks_match_whole(kthvalue_selection) -> None:
    inputs, base = _family(ties=True)
    model_params = [{"weight": 0.6, "density": 0.2}, {"weight": 0.4, "density": 0.6}, {"weight": 1.0, "density": 0.9}]
    params = {"rescale": True}
    whole = _run_whole("ties", inputs, base, model_params, params)
    torch.testing.assert_close(_run_blocks("ties", inputs, base, model_params, params), whole, rtol=1e-6, atol=1e-6)


def test_slerp_and_passthrough_blocks() -> None:
    inputs, base = _family(n=1)
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(
            _run_blocks("slerp", inputs, base, [{}], {"t": t}),
            _run_whole("slerp", inputs, base, [{}], {"t": t}),
            rtol=1e-6,
            atol=1e-6,
        )
    stored = inputs[0].to(torch.bfloat16)
    copy = _run_blocks("passthrough", [stored], None, [{}], {})
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, stored)  # copied as stored, no conversion
    scaled = _run_blocks("passthrough", inputs, None, [{"scale": 0.5}], {})
    assert torch.equal(scaled, inputs[0] * 0.5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_blocks_are_seeded_keep_density_and_rescale(method) -> None:
    inputs, base = _family(shape=(200, 500), n=1)
    model_params = [{"weight": 1.0, "density": 0.3}]
    first = _run_blocks(method, inputs, base, model_params, {}, seed=5)
    assert torch.equal(first, _run_blocks(method, inputs, base, model_params, {}, seed=5))
    assert not torch.equal(first, _run_blocks(method, inputs, base, model_params, {}, seed=6))
    delta, kept = inputs[0] - base, first - base
    fraction = float((kept != 0).float().mean())
    assert abs(fraction - 0.3) < 0.01
    # L1 rescale (mergekit's rescale_norm=l1): the kept entries carry the whole task vector's L1 norm
    assert float(kept.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
    plain = _run_blocks(method, inputs, base, model_params, {"rescale": False}, seed=5)
    assert torch.equal(plain != base, first != base)  # same masks with and without rescale
    assert float((plain - base).abs().sum()) == pytest.approx(0.3 * float(delta.abs().sum()), rel=0.02)


RECIPES = {
    "linear": {"models": [("a", {"weight": 0.3}), ("b", {"weight": 0.7})]},
    "task_arithmetic": {"base": True, "models": [("a", {"weight": 0.5}), ("b", {"weight": 0.8})]},
    "ties": {"base": True, "models": [("a", {"weight": 0.5, "density": 0.4}), ("b", {"weight": 0.8, "density": 0.7})]},
    "slerp": {"base": True, "models": [("a", {})], "parameters": {"t": 0.4}},
    "dare_ties": {
        "base": True,
        "models": [("a", {"weight": 0.5, "density": 0.4}), ("b", {"weight": 0.8, "density": 0.7})],
    },
    "model_stock": {"base": True, "models": [("a", {}), ("b", {}), ("c", {})]},
    "nuslerp": {"base": True, "models": [("a", {"weight": 0.4}), ("b", {"weight": 0.6})]},
}


def _recipe(family, method) -> Recipe:
    spec = RECIPES[method]
    data = {
        "merge_method": method,
        "models": [{"model": str(family[name]), "parameters": params} for name, params in spec["models"]],
        "parameters": spec.get("parameters", {}),
        "dtype": "float32",
    }
    if spec.get("base"):
        data["base_model"] = str(family["base"])
    return Recipe.from_dict(data)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_engine_block_path_matches_whole_path_and_memory_path(random_family, tmp_path, monkeypatch, method) -> None:
    from transformers import AutoModelForCausalLM

    recipe = _recipe(random_family, method)
    whole = load_all(merge_to_disk(recipe, tmp_path / "whole"))
    monkeypatch.setattr(engine, "WHOLE_TENSOR_MAX", 0)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 2000)
    blocked = load_all(merge_to_disk(recipe, tmp_path / "blocks"))
    assert blocked.keys() == whole.keys()
    for name, tensor in whole.items():
        if method == "dare_ties":  # different random streams: compare the statistics, not the entries
            assert blocked[name].shape == tensor.shape
        elif method in ("linear", "task_arithmetic"):
            assert torch.equal(blocked[name], tensor), name
        else:
            torch.testing.assert_close(blocked[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    model = AutoModelForCausalLM.from_pretrained(random_family["base"], dtype=torch.float32)
    materialize_into(model, plan_recipe(recipe))
    state = model.state_dict()
    for name, tensor in blocked.items():
        assert torch.equal(state[name], tensor), name  # the search scores exactly what merge writes


def test_block_release_keeps_resident_pages_bounded(random_family, tmp_path, monkeypatch) -> None:
    """Released row ranges really leave the mapping: reading a released block again still works."""
    monkeypatch.setattr(engine, "WHOLE_TENSOR_MAX", 0)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 512)
    recipe = _recipe(random_family, "ties")
    plan = plan_recipe(recipe)
    try:
        job = max(plan.jobs, key=lambda j: j.shape[0] if j.shape else 0)
        first = engine.compute_tensor(plan, job)
        again = engine.compute_tensor(plan, job)
        assert torch.equal(first, again)
    finally:
        plan.close()


@pytest.mark.parametrize("misleading_sample", [False, True])
def test_ties_threshold_exact_whether_the_sample_predicts_it_or_not(
    kthvalue_selection, monkeypatch, misleading_sample
) -> None:
    """The sampled blocks predict where the threshold lies; when they mislead (here: the sampled
    rows' task vectors are 100x larger), a second pass still finds the exact threshold."""
    inputs, base = _family(shape=(400, 250), n=2)
    if misleading_sample:
        rows_per_block = 1000 // 250
        for start in range(0, 400, rows_per_block * blocks.SAMPLE_EVERY):
            for x in inputs:
                x[start : start + rows_per_block] = base[start : start + rows_per_block] + 100 * (
                    x[start : start + rows_per_block] - base[start : start + rows_per_block]
                )
    outcomes = []
    original = blocks._RadixSelect.window_holds_boundary
    monkeypatch.setattr(
        blocks._RadixSelect, "window_holds_boundary", lambda self: outcomes.append(original(self)) or outcomes[-1]
    )
    model_params = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}]
    whole = _run_whole("ties", inputs, base, model_params, {})
    assert torch.equal(_run_blocks("ties", inputs, base, model_params, {}), whole)
    assert outcomes and all(outcomes) is (not misleading_sample)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write fallback"])
def test_passthrough_copies_stored_bytes(random_family, tmp_path, monkeypatch, kernel_copy) -> None:
    """Unscaled passthrough tensors in the output dtype are copied file to file, byte for byte."""
    import os

    from evomerge.merge.io import ShardedWriter

    calls = []
    original = ShardedWriter.copy_range
    monkeypatch.setattr(ShardedWriter, "copy_range", lambda self, *a: calls.append(a[0]) or original(self, *a))
    if not kernel_copy:

        def unsupported(*args, **kwargs):
            raise OSError("not supported")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(random_family["a"]), "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": str(random_family["b"]),
                            "layer_range": [1, 3],
                            "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                        }
                    ]
                },
            ],
            "dtype": "float32",
        }
    )
    out = load_all(merge_to_disk(recipe, tmp_path / "out"))
    a, b = load_all(random_family["a"]), load_all(random_family["b"])
    assert calls and len(calls) < len(out)  # scaled tensors are computed, the rest copied
    assert torch.equal(out["model.layers.0.mlp.down_proj.weight"], a["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(out["model.layers.3.self_attn.o_proj.weight"], 0.5 * b["model.layers.2.self_attn.o_proj.weight"])


@pytest.mark.parametrize(
    ("method", "model_params", "params", "with_base"),
    [
        ("nuslerp", [{"weight": 0.3}, {"weight": 0.9}], {}, True),
        ("nuslerp", [{"weight": 0.3}, {"weight": 0.9}], {}, False),
        ("nuslerp", [{"weight": 1.0}, {"weight": 1.0}], {"nuslerp_flatten": False}, True),
        ("nuslerp", [{"weight": 1.0}, {"weight": 2.0}], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
        ("model_stock", [{}, {}, {}], {}, True),
        ("model_stock", [{}, {}, {}], {"filter_wise": True}, True),
    ],
)
def test_nuslerp_and_model_stock_blocks_match_whole(method, model_params, params, with_base) -> None:
    inputs, base = _family(n=len(model_params))
    spec = methods.get_method(method)
    bound, bound_models = spec.bind(params, model_params)
    job = JobInputs(inputs, base if with_base else None, dtype=torch.float32, device="cpu", block_elements=1000)
    snapshot = [x.clone() for x in inputs]
    pieces = list(BLOCK_KERNELS[method](job, bound_models, bound, 0))
    blocked = pieces[0][1] if pieces[0][0] is Ellipsis else torch.cat([p for _, p in pieces])
    whole = spec.fn(inputs, base if with_base else None, bound_models, bound, None)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(inputs, snapshot)), "inputs were written into"
    split = bound.get("nuslerp_flatten", True) or not bound.get("nuslerp_row_wise", False)
    assert (len(pieces) > 1) == split  # row-wise nuslerp (vectors down the columns) is merged whole

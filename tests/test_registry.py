"""The method declarations (``evomerge/recipe/methods.py``): torch-free, and the one source of the
engine's functions and block kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from evomerge.merge import blocks, methods
from evomerge.recipe import methods as declared
from evomerge.recipe.methods import (
    SPECS,
    Consensus,
    Sparsification,
    task_arithmetic_family,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    [
        "evomerge.recipe",
        "evomerge.recipe.methods",
        "evomerge.merge.routing",
        # reading a run (front, picks, export) and resolving a config or a space: no torch either
        "evomerge.search.front",
        "evomerge.search.report",
        "evomerge.search.picks",
        "evomerge.search.export",
        "evomerge.search.config",
        "evomerge.search.space",
        "evomerge.search.genome",
        # the runtime: a Ray worker whose evaluator scores no model (a fake, a sleeping benchmark) loads none
        "evomerge.runtime",
        "evomerge.eval.result",
    ],
)
def test_schema_imports_no_torch(module: str) -> None:
    """Reading, validating and writing recipes (front, export, the search space) never loads torch."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_engine_registry_is_the_declarations_with_functions() -> None:
    assert list(methods.METHODS) == list(SPECS)
    for name, spec in SPECS.items():
        engine = methods.get_method(name)
        assert isinstance(engine, declared.MethodSpec)
        assert {f.name: getattr(engine, f.name) for f in fields(spec)} == {
            f.name: getattr(spec, f.name) for f in fields(spec)
        }
        assert engine.fn.__name__ == name
    assert methods.REQUIRED is declared.REQUIRED  # `default is REQUIRED` holds whichever module it came from
    with pytest.raises(ValueError, match="valid methods"):
        declared.get_method("frankenmerge")


def test_block_kernels_follow_from_the_declarations() -> None:
    """Every declared method has a kernel except the task-arithmetic members whose sparsification
    has no block selector (breadcrumbs, della)."""
    assert sorted(blocks.BLOCK_KERNELS) == sorted(
        [
            "linear",
            "passthrough",
            "slerp",
            "nuslerp",
            "model_stock",
            "task_arithmetic",
            "ties",
            "dare_ties",
            "dare_linear",
        ]
    )


def test_bool_params_are_the_declared_bool_defaults() -> None:
    from evomerge.recipe import BOOL_PARAMS

    assert BOOL_PARAMS == {"normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise"}


def test_a_new_family_member_needs_only_its_declaration(monkeypatch) -> None:
    """TIES trimming with a sign election by count (not in mergekit's registry): the declaration
    alone gives its parameters, whole-tensor function and block kernel, and the two agree."""
    spec = task_arithmetic_family(
        "ties_count",
        "TIES trimming, signs elected by count.",
        sparsification=Sparsification.MAGNITUDE,
        consensus=Consensus.COUNT,
        normalize=True,
        rescale=False,
    )
    assert dict(spec.model_params) == {"weight": declared.REQUIRED, "density": 1.0} and not spec.randomized
    engine = methods.implement(spec)
    kernel = blocks.block_kernel(spec)
    assert kernel is not None
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 50, generator=g)
    inputs = [base + 0.1 * torch.randn(64, 50, generator=g) for _ in range(3)]
    params, model_params = spec.bind({}, [{"weight": w, "density": 0.5} for w in (0.5, 0.3, 0.9)])
    monkeypatch.setattr(methods, "EXACT_SORT_MAX_NUMEL", 0)  # the selection the blocks implement
    whole = engine.fn(inputs, base, model_params, params, None)
    job = blocks.JobInputs(inputs, base, dtype=torch.float32, device="cpu", block_elements=500)
    pieces = list(kernel(job, model_params, params, 0))
    assert len(pieces) > 1
    assert torch.equal(torch.cat([piece for _, piece in pieces]), whole)

"""Shared fixtures: tiny random Llama checkpoints (seconds), the toy zoo (built once, cached), and one
loopback-only Ray with one pool of fake workers for all the runtime tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_random_llama(
    path: Path,
    seed: int,
    *,
    layers: int = 3,
    hidden: int = 32,
    vocab: int = 64,
    dtype: torch.dtype = torch.float32,
    base: Path | None = None,
    noise: float = 0.05,
    **config_overrides,
) -> Path:
    """A small random LlamaForCausalLM saved as safetensors; with ``base``, a perturbed copy of it (a 'fine-tune')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def random_family(tmp_path_factory) -> dict[str, Path]:
    """A random base and three perturbed 'fine-tunes' of it, float32, 3 layers."""
    root = tmp_path_factory.mktemp("family")
    base = make_random_llama(root / "base", 0)
    family = {"base": base}
    for i, name in enumerate(["a", "b", "c"], start=1):
        family[name] = make_random_llama(root / name, i, base=base)
    return family


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The toy zoo for seed 0, built once per machine (cached outside the repo)."""
    from evomerge.zoo.build import build_zoo, default_zoo_dir

    return build_zoo(default_zoo_dir(0), 0, progress=False).parent


@pytest.fixture(scope="session")
def local_ray():
    """One private Ray with 5 logical CPUs (not cores: nothing runs until a worker is asked for): the
    shared pool's 2 workers, and 3 more, so that a test starting 2 workers of its own (or the start-failure
    test's 1) finds room whether or not the shared pool is alive, in any test order."""
    ray = pytest.importorskip("ray")
    from evomerge.runtime import start_local_ray

    owned = not ray.is_initialized()
    if owned:
        start_local_ray(5)
    yield ray
    if owned:
        ray.shutdown()


@pytest.fixture(scope="session")
def pool(local_ray):
    """Two Ray workers with the scripted fake evaluator (sleep / die / hang), shared by the runtime tests."""
    from runtime_support import FAKES_ENV, TIMEOUT, fake_spec

    from evomerge.runtime import RayExecutor

    executor = RayExecutor(fake_spec(), workers=2, timeout=TIMEOUT, runtime_env=FAKES_ENV)
    yield executor
    executor.shutdown()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow sqlite database, made once (creating one runs MLflow's migrations, ~3 s)."""
    from evomerge.tracking.store import DB_FILE, make_client

    path = tmp_path_factory.mktemp("store") / DB_FILE
    make_client(f"sqlite:///{path}").search_experiments()
    return path

#!/usr/bin/env python
"""In-place materialization of a 1.1B candidate on this CPU, next to the memory-bandwidth limit.

A synthetic Llama family at TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV
heads, vocabulary 32000: 1.10B parameters; the zoo's tokenizer is saved with it, its ids a subset of the
vocabulary; nothing is scored here), stored in bfloat16: a random base
and three perturbed copies. Each candidate is a task-arithmetic recipe over the three with fresh random
weights, merged into one resident float32 model in place (what a search worker does per candidate),
the sources read from their memory-mapped checkpoints (``resident_sources: off``) or kept resident
(``on``). The limit: every source byte read once and every resident byte written once, at the copy
bandwidth measured here in the same run (a 1 GiB float32 ``copy_``, best of 5). Reported: seconds per
candidate and their ratio to that limit.

    .venv/bin/python scripts/bench_materialize.py [--candidates 3] [--threads 2] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evomerge.merge.engine import materialize_into  # noqa: E402
from evomerge.merge.plan import build_plan, open_checkpoints  # noqa: E402
from evomerge.merge.resident import ResidentSources  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402


def make_family(root: Path) -> tuple[str, list[str], int]:
    """base, a, b, c under ``root`` (reused when already there)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    names = ["base", "a", "b", "c"]
    if all(
        (root / n / "model.safetensors").exists() or (root / n / "model.safetensors.index.json").exists() for n in names
    ):
        params = json.loads((root / "params.json").read_text())["params"]
        return str(root / "base"), [str(root / n) for n in names[1:]], params
    zoo = build_zoo(default_zoo_dir(0), 0, progress=False).parent
    tokenizer = AutoTokenizer.from_pretrained(zoo / "models" / "base")
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in names:
        if name != "base":
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    param.copy_(base_state[key] + 0.01 * torch.randn_like(base_state[key]))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        print(f"  saved {name}", file=sys.stderr, flush=True)
    (root / "params.json").write_text(json.dumps({"params": params, "vocab": 32000}))
    return str(root / "base"), [str(root / n) for n in names[1:]], params


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second moved (read + written) by a float32 ``copy_`` of ``gib`` GiB, best of 5."""
    src = torch.rand(int(gib * 2**30 / 4))
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where the family is written (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the family for another run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-materialize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, models, params = make_family(work)
        rng = np.random.default_rng(0)
        recipes = [
            Recipe.from_dict(
                {
                    "merge_method": "task_arithmetic",
                    "base_model": base,
                    "dtype": "float32",
                    "models": [
                        {"model": m, "parameters": {"weight": float(w)}}
                        for m, w in zip(models, rng.uniform(0.2, 1.0, 3))
                    ],
                }
            )
            for _ in range(args.candidates + 1)
        ]
        from transformers import AutoConfig, AutoModelForCausalLM

        plans = [build_plan(r, open_checkpoints(r)) for r in recipes]
        config = AutoConfig.for_model(**{k: v for k, v in plans[0].config.items() if k != "dtype"})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        read = sum(
            plans[0].checkpoints[m].get(n).numel() * plans[0].checkpoints[m].get(n).element_size()
            for job in plans[0].jobs
            for m, n in (*job.inputs, *((job.base,) if job.base else ()))
        )
        written = sum(p.numel() * p.element_size() for p in model.parameters())
        bandwidth = copy_bandwidth()
        limit = (read + written) / bandwidth
        rows = []
        for mode in ("off", "on"):
            source = None
            if mode == "on":
                source = ResidentSources("cpu")
                assert source.admit(plans[0]), source.refused
            times = []
            for i, plan in enumerate(plans):
                started = time.perf_counter()
                materialize_into(model, plan, seed=0, source=source)
                if i:  # the first one warms the page cache
                    times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            rows.append((mode, seconds, seconds / limit))
            print(f"  resident {mode}: {seconds:.2f} s per candidate", file=sys.stderr, flush=True)
        print(
            f"\n#### {params / 1e9:.2f}B parameters, sources bfloat16, resident model float32, {args.threads} threads, "
            f"median of {args.candidates}\n"
        )
        print(
            f"Bytes per candidate: {read / 1e9:.2f} GB read (4 sources) + {written / 1e9:.2f} GB written = "
            f"{(read + written) / 1e9:.2f} GB; measured copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write); "
            f"limit {limit:.2f} s per candidate.\n"
        )
        print("| sources | s per candidate | × the bandwidth limit |")
        print("|---|---:|---:|")
        for mode, seconds, ratio in rows:
            print(
                f"| {'resident (on)' if mode == 'on' else 'memory-mapped checkpoints (off)'} | {seconds:.2f} | {ratio:.1f}× |"
            )
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

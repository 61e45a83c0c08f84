#!/usr/bin/env python
"""Candidate throughput of proxy evaluation, three ways, side by side in one run.

(a) disk:       merge to disk, reload with from_pretrained, lm-eval's evaluator (mergekit-evolve's
                on-disk mode)
(b) mem+lmeval: merge in memory into the resident model, lm-eval's evaluator over HFLM
(c) mem+fast:   merge in memory, the fast backend (batched log-likelihood over pre-built requests)

on the toy zoo and on a larger synthetic Llama (random weights, the zoo's tokenizer and tasks: the
scores are meaningless there, the timings are not). Each candidate is a task-arithmetic recipe with
fresh random weights, so nothing is served from a cache.

    .venv/bin/python scripts/bench_eval.py [--candidates 6] [--limit 50] [--large-hidden 512 --large-layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.eval.evaluator import CandidateEvaluator  # noqa: E402
from evomerge.eval.tasks import Objective  # noqa: E402
from evomerge.merge.engine import merge_to_disk  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402


def recipes(base: str, models: list[str], count: int, seed: int) -> list[Recipe]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        weights = rng.uniform(0.2, 1.0, len(models))
        out.append(
            Recipe.from_dict(
                {
                    "merge_method": "task_arithmetic",
                    "base_model": base,
                    "dtype": "float32",
                    "models": [
                        {"model": m, "parameters": {"weight": round(float(w), 6)}} for m, w in zip(models, weights)
                    ],
                }
            )
        )
    return out


def make_large(zoo: Path, root: Path, hidden: int, layers: int) -> tuple[str, list[str], int]:
    """A bigger Llama with the zoo's tokenizer: a random base and three perturbed copies."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    manifest = json.loads((zoo / "zoo.json").read_text())
    tokenizer_dir = zoo / manifest["base"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    paths = []
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    for name in ["base", "a", "b", "c"]:
        model = base if name == "base" else None
        if model is None:
            model = LlamaForCausalLM(config)
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    params = sum(p.numel() for p in base.parameters())
    return paths[0], paths[1:], params


def time_disk(objectives, include, candidates: list[Recipe], work: Path) -> dict:
    """(a): merge to disk, load, lm-eval. A fresh evaluator per candidate is what on-disk mode pays."""
    evaluator = CandidateEvaluator(objectives, include_paths=[include], backend="lm-eval")
    merge_s = score_s = 0.0
    values = []
    for i, recipe in enumerate(candidates):
        start = time.perf_counter()
        out = merge_to_disk(recipe, work / f"cand{i}", overwrite=True)
        merged = time.perf_counter()
        result = evaluator.evaluate_checkpoint(out)
        merge_s += merged - start + result.materialize_seconds  # write + reload
        score_s += result.score_seconds
        values.append(result.objectives)
        shutil.rmtree(out)
    return summarize("disk+lm-eval", merge_s, score_s, len(candidates), values)


def time_memory(objectives, include, candidates: list[Recipe], backend: str) -> dict:
    evaluator = CandidateEvaluator(objectives, include_paths=[include], backend=backend)
    evaluator.evaluate(candidates[0])  # warm-up: resident model, tokenizer, request building
    evaluator._cache.clear()
    merge_s = score_s = 0.0
    values = []
    for recipe in candidates:
        result = evaluator.evaluate(recipe)
        assert result.ok, result.reason
        merge_s += result.materialize_seconds
        score_s += result.score_seconds
        values.append(result.objectives)
    return summarize(f"memory+{backend}", merge_s, score_s, len(candidates), values)


def summarize(name: str, merge_s: float, score_s: float, n: int, values: list[dict]) -> dict:
    total = merge_s + score_s
    return {
        "mode": name,
        "candidates": n,
        "seconds_per_candidate": total / n,
        "candidates_per_hour": 3600 * n / total,
        "materialize_fraction": merge_s / total,
        "materialize_s": merge_s / n,
        "score_s": score_s / n,
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--limit", type=int, default=50, help="items per task (search split)")
    parser.add_argument("--large-hidden", type=int, default=512)
    parser.add_argument("--large-layers", type=int, default=8)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    zoo = build_zoo(default_zoo_dir(0), 0, progress=False).parent
    manifest = json.loads((zoo / "zoo.json").read_text())
    include = str(zoo / manifest["include_path"])
    objectives = [Objective(task=t, metric="acc", split="search", limit=args.limit) for t in manifest["tasks"].values()]
    setups = {"zoo": (str(zoo / manifest["base"]), [str(zoo / p) for p in manifest["models"].values()], None)}
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        if not args.skip_large:
            base, models, params = make_large(zoo, work / "large", args.large_hidden, args.large_layers)
            setups[f"synthetic {params / 1e6:.0f}M"] = (base, models, params)
        rows = []
        for name, (base, models, _) in setups.items():
            candidates = recipes(base, models, args.candidates, seed=1)
            results = [
                time_disk(objectives, include, candidates, work),
                time_memory(objectives, include, candidates, "lm-eval"),
                time_memory(objectives, include, candidates, "fast"),
            ]
            same = all(r["values"] == results[0]["values"] for r in results[1:])
            for r in results:
                r["model"] = name
                r["speedup_vs_disk"] = r["candidates_per_hour"] / results[0]["candidates_per_hour"]
                r["same_scores_as_disk"] = same
                rows.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"# bench_eval: {platform.node()} · {os.cpu_count()} cores · torch {torch.__version__} · "
        f"{args.candidates} candidates · {len(objectives)} tasks × {args.limit} items"
    )
    print(
        "| model | mode | candidates/hour | s/candidate | materialize s | score s | materialize share | × disk | same scores |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {r['candidates_per_hour']:.0f} | {r['seconds_per_candidate']:.3f} | "
            f"{r['materialize_s']:.3f} | {r['score_s']:.3f} | {100 * r['materialize_fraction']:.0f}% | "
            f"{r['speedup_vs_disk']:.1f}× | {'yes' if r['same_scores_as_disk'] else 'NO'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

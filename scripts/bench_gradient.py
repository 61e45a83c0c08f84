#!/usr/bin/env python
"""The gradient optimizer's cost: seconds per Adam step of the fit and peak memory, on the toy zoo and
on a bigger synthetic family (a random Llama with the zoo's tokenizer and three perturbed copies, scored
on the zoo's tasks: the numbers are costs, not qualities), on CPU or CUDA.

The fit is run through the search driver exactly as ``evomerge search`` runs it (in-process executor,
no tracking); the fit's points are then scored as candidates.

    .venv/bin/python scripts/bench_gradient.py                              # zoo seed 0, this machine's device
    .venv/bin/python scripts/bench_gradient.py --large 2048 22 --steps 5    # + a 1.1 B synthetic family
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from evomerge.runtime import make_executor  # noqa: E402
from evomerge.search.config import load_run_config, resolve_run_config  # noqa: E402
from evomerge.search.driver import Search  # noqa: E402
from evomerge.search.rundir import RunDir  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402


def timed_search(run, work: Path) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    executor = make_executor(run)
    started = time.perf_counter()
    try:
        summary = Search(run, RunDir(work), executor).execute()
    finally:
        executor.shutdown()
    wall = time.perf_counter() - started
    found = json.loads((work / "optimizer.json").read_text())
    steps = found["steps"]
    return {
        "device": found["device"],
        "genes": len(found["genes"]),
        "steps": steps,
        "fit_s": found["fit_seconds"],
        "setup_s": found["setup_seconds"],
        "s_per_step": (found["fit_seconds"] - found["setup_seconds"]) / (steps + 1),
        "scored": summary.evaluated,
        "wall_s": wall,
        "loss_first_last": [found["losses"][0], found["losses"][-1]],
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="runtime.device (default: cuda when visible, else cpu)")
    parser.add_argument("--large", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"), help="add a synthetic family")
    parser.add_argument("--steps", type=int, default=5, help="fit steps for the synthetic family")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    zoo = build_zoo(default_zoo_dir(args.zoo_seed), args.zoo_seed, progress=False).parent
    os.environ["EVOMERGE_ZOO_DIR"] = str(zoo)
    device = [f"runtime.device={args.device}"] if args.device else []
    work = Path(tempfile.mkdtemp(prefix="bench-gradient-"))
    results = {}
    run = load_run_config(ROOT / "configs" / "zoo-ps-gradient.yaml", ["runtime.workers=0", *device])
    results["zoo (96 genes, 300 items)"] = timed_search(run, work / "zoo")
    print(json.dumps(results, indent=1), flush=True)
    if args.large:
        from bench_eval import make_large

        hidden, layers = args.large
        base, models, params = make_large(zoo, work / "large", hidden, layers)
        raw = load_run_config(ROOT / "configs" / "zoo-ps-gradient.yaml").raw
        raw["search_space"] = {
            "kind": "ps",
            "models": models,
            "base_model": base,
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 2.0}},
            "granularity": "layer",
            "split_modules": True,
        }
        raw["optimizer"].update(steps=args.steps, budget=2)
        raw["runtime"] = {"workers": 0, **({"device": args.device} if args.device else {})}
        raw["zoo"] = str(zoo)
        run = resolve_run_config(raw, base_dir=ROOT / "configs")
        results[f"synthetic {params / 1e9:.2f} B ({hidden} x {layers})"] = timed_search(run, work / "large-run")
    print(f"\n# bench_gradient · {os.cpu_count()} cores · torch {torch.__version__}\n")
    print(
        "| family | device | genes | steps | s per step | fit s (setup: read sources, tokenize) "
        "| points scored | wall s | peak CUDA GiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        peak = "" if r["peak_cuda_gib"] is None else f"{r['peak_cuda_gib']:.1f}"
        print(
            f"| {name} | {r['device']} | {r['genes']} | {r['steps']} | {r['s_per_step']:.3f} "
            f"| {r['fit_s']:.1f} ({r['setup_s']:.1f}) "
            f"| {r['scored']} | {r['wall_s']:.1f} | {peak} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

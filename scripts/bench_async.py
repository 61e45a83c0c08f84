#!/usr/bin/env python
"""Barrier vs asynchronous search: how busy workers stay when candidates vary in cost.

Ray actors stand in for workers: each candidate sleeps a log-normal time drawn from its recipe's hash
(``tests/fake_evaluators.py:slow_quadratic``; median ``--median-s``, log-space sigma ``--sigma``), so
the same candidate costs the same in both modes, and returns the quadratic landscape's objectives.
The search is the real one (``Search`` on configs/zoo-ps-nsga2.yaml's space, the real Ray pool, the
real run dir with its checkpoints), in ``optimizer.mode: barrier`` and ``async``, with the population
at twice the workers (the README's advice for barrier mode). Sleeping actors leave the CPUs free, so
32 of them fit on a small machine; the figures measure scheduling, not the machine's speed.

Reported per setting: candidates per hour, the idle share of worker time (1 - time inside candidates
/ (workers x wall), from the records' own clocks; and the pool's ``idle_fraction()``), the same share
until the last candidate starts (the steady state; the drain after it, while the slowest candidates
finish, is the same in both modes and shrinks relative to the run as the budget grows), and the best
candidate's mean objective (the fake landscape's; 1.0 is unreachable, higher is better), to see that
async mode still optimizes.

    .venv/bin/python scripts/bench_async.py [--workers 8 32] [--per-worker 30] [--median-s 1] [--sigma 1] [--modes barrier async]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.runtime import make_executor, start_local_ray  # noqa: E402
from evomerge.search.config import load_run_config  # noqa: E402
from evomerge.search.driver import Search  # noqa: E402
from evomerge.search.rundir import RunDir  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402

CONFIG = ROOT / "configs" / "zoo-ps-nsga2.yaml"


def one_run(workers: int, mode: str, budget: int, optimizer: str, seed: int, scratch: Path) -> dict:
    overrides = [
        f"optimizer.name={optimizer}",
        f"optimizer.mode={mode}",
        f"optimizer.population={2 * workers}",
        f"optimizer.budget={budget}",
        f"optimizer.seed={seed}",
        f"runtime.workers={workers}",
        "runtime.cpus_per_worker=1",
    ]
    run = load_run_config(CONFIG, overrides)
    executor = make_executor(run, evaluator_factory="fake_evaluators:slow_quadratic")
    try:
        started, started_at = time.perf_counter(), time.time()
        summary = Search(run, RunDir(scratch / f"{optimizer}-{mode}-{workers}-{seed}"), executor).execute()
        wall = time.perf_counter() - started
        pool_idle = executor.idle_fraction()
    finally:
        executor.shutdown()
    records = list(RunDir(scratch / f"{optimizer}-{mode}-{workers}-{seed}").records())
    scored = [r for r in records if not r.cached]
    inside = sum(r.seconds for r in scored)
    # steady state: until the last candidate starts (what follows is the drain, the same in both modes)
    last_start = max(r.time - r.seconds for r in scored)
    busy = sum(max(0.0, min(r.time, last_start) - max(r.time - r.seconds, started_at)) for r in scored)
    best = summary.best
    return {
        "workers": workers,
        "mode": mode,
        "optimizer": optimizer,
        "seed": seed,
        "candidates": summary.evaluated,
        "wall_s": wall,
        "per_hour": 3600 * summary.evaluated / wall,
        "idle": 1 - inside / (workers * wall),
        "idle_steady": 1 - busy / (workers * (last_start - started_at)),
        "pool_idle": pool_idle,
        "best_mean": statistics.mean(best.objectives.values()) if best is not None else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--per-worker", type=int, default=30, help="budget = this x workers candidates")
    parser.add_argument("--median-s", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--optimizers", nargs="+", default=["nsga2", "cma"], choices=["nsga2", "cma"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--modes", nargs="+", default=["barrier", "async"], choices=["barrier", "async"])
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    zoo = build_zoo(default_zoo_dir(args.zoo_seed), args.zoo_seed, progress=False).parent
    os.environ["EVOMERGE_ZOO_DIR"] = str(zoo)
    fakes_env = {
        "env_vars": {
            "PYTHONPATH": str(ROOT / "tests"),
            "EVOMERGE_FAKE_MEDIAN_S": str(args.median_s),
            "EVOMERGE_FAKE_SIGMA": str(args.sigma),
        }
    }
    start_local_ray(max(args.workers), runtime_env=fakes_env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-async-") as tmp:
        for workers in args.workers:
            for optimizer in args.optimizers:
                for seed in args.seeds:
                    for mode in args.modes:
                        row = one_run(workers, mode, args.per_worker * workers, optimizer, seed, Path(tmp))
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    print(
        f"\ncandidate cost: log-normal, median {args.median_s:g} s, sigma {args.sigma:g} "
        f"(mean {args.median_s * 2.718281828 ** (args.sigma**2 / 2):.2f} s); population = 2 x workers; "
        f"budget = {args.per_worker} x workers\n"
    )
    print(
        "| workers | optimizer | mode | candidates | wall (s) | candidates/hour | idle | idle (pool) "
        "| idle before the drain | best mean |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for workers in args.workers:
        for optimizer in args.optimizers:
            for mode in args.modes:
                group = [r for r in rows if (r["workers"], r["optimizer"], r["mode"]) == (workers, optimizer, mode)]
                print(
                    f"| {workers} | {optimizer} | {mode} | {statistics.mean(r['candidates'] for r in group):.0f} "
                    f"| {statistics.mean(r['wall_s'] for r in group):.1f} "
                    f"| {statistics.mean(r['per_hour'] for r in group):,.0f} "
                    f"| {100 * statistics.mean(r['idle'] for r in group):.1f}% "
                    f"| {100 * statistics.mean(r['pool_idle'] for r in group):.1f}% "
                    f"| {100 * statistics.mean(r['idle_steady'] for r in group):.1f}% "
                    f"| {statistics.mean(r['best_mean'] for r in group):.4f} |"
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

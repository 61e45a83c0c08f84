#!/usr/bin/env python
"""How much MLflow tracking costs a search.

A search-like loop - per candidate: wait for a worker (a sleep of --candidate-seconds), append the
record to evaluations.jsonl (fsync'ed, as the driver does); after each generation, the generation
hook - runs twice over the same synthetic records: without a tracker, and with one logging to a
fresh sqlite store in the run dir (the default), closed at the end (its final flush counts).

Prints the wall-clock overhead in percent, the time the hooks blocked the loop, and the background
worker's wall and CPU time (the CPU it takes from workers on the same machine).

    python scripts/bench_tracking.py                        # 200 records, 0.25 s per candidate
    python scripts/bench_tracking.py --candidate-seconds 0  # pure logging throughput
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def make_config(models: list[str]) -> dict:
    from evomerge.search.space import load_space

    space = {
        "models": models,
        "base_model": "/zoo/base",
        "method": "ties",
        "parameters": {"weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.2, "high": 1.0}},
        "granularity": "layer",
        "split_attn_mlp": True,
    }
    return {
        "name": "bench-tracking",
        "search_space": load_space(space).model_dump(mode="json"),
        "objectives": [
            {"task": "zoo_reverse", "metric": "acc", "name": "reverse"},
            {"task": "zoo_sort", "metric": "acc", "name": "sort"},
        ],
        "optimizer": {"name": "nsga2", "population": 8, "budget": 200, "sigma": 0.25, "seed": 0},
        "tracking": {"uri": None, "experiment": "evomerge"},
    }


def make_records(config: dict, count: int, population: int, layers: int) -> list:
    from evomerge.search.genome import make_genome
    from evomerge.search.record import CandidateRecord
    from evomerge.search.space import load_space

    genome = make_genome(load_space(config["search_space"]), num_layers=layers)
    rng = np.random.default_rng(0)
    records = []
    for cid in range(count):
        x = rng.random(genome.dim)
        recipe = genome.decode(x)
        failed = cid % 37 == 5
        records.append(
            CandidateRecord.from_json(
                {
                    "id": cid,
                    "generation": cid // population,
                    "genome": [round(float(v), 8) for v in x],
                    "recipe_hash": recipe.content_hash(),
                    "recipe": recipe.to_dict(),
                    "objectives": {} if failed else {"reverse": float(rng.random()), "sort": float(rng.random())},
                    "status": "failed" if failed else "ok",
                    "reason": "timeout" if failed else None,
                    "worker": f"w{cid % 2}",
                    "seconds": 1.0,
                    "materialize_seconds": 0.3,
                    "score_seconds": 0.7,
                    "cached": False,
                    "attempts": 1,
                    "time": time.time(),
                }
            )
        )
    return records


def loop(records: list, config: dict, root: Path, seconds: float, tracked: bool) -> dict:
    from evomerge.search.rundir import RunDir
    from evomerge.tracking import Tracker

    run_dir = RunDir(root)
    run_dir.write_config(config)
    tracker = Tracker(config, root) if tracked else None
    hook_max = 0.0
    began = time.perf_counter()
    if tracker is not None:
        tracker.start(resume=False)
    for i, record in enumerate(records):
        time.sleep(seconds)
        record = record.replace(time=time.time())
        run_dir.append(record)
        if tracker is not None:
            t = time.perf_counter()
            tracker.on_record(record)
            if i + 1 == len(records) or records[i + 1].generation != record.generation:
                tracker.on_generation(record.generation)
            hook_max = max(hook_max, time.perf_counter() - t)
    loop_wall = time.perf_counter() - began
    close = 0.0
    if tracker is not None:
        t = time.perf_counter()
        tracker.close()
        close = time.perf_counter() - t
    result = {"wall": time.perf_counter() - began, "loop": loop_wall, "close": close, "hook_max": hook_max}
    if tracker is not None:
        result.update(tracker.stats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument(
        "--candidate-seconds",
        type=float,
        default=0.25,
        help="simulated wait per candidate in the driver (default 0.25)",
    )
    parser.add_argument("--layers", type=int, default=16, help="layers of the synthetic recipes (per-layer genes)")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="alternate plain/tracked runs this often; medians")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = make_config([f"/zoo/model{i}" for i in range(args.models)])
    config["optimizer"]["population"] = args.population
    records = make_records(config, args.records, args.population, args.layers)
    bases, trackeds = [], []
    for _i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
            bases.append(loop(records, config, Path(tmp) / "plain", args.candidate_seconds, tracked=False))
            trackeds.append(loop(records, config, Path(tmp) / "tracked", args.candidate_seconds, tracked=True))
    base = sorted(bases, key=lambda r: r["wall"])[len(bases) // 2]
    tracked = sorted(trackeds, key=lambda r: r["wall"])[len(trackeds) // 2]
    overhead = 100.0 * (tracked["wall"] - base["wall"]) / base["wall"]
    if args.repeat > 1:
        print(
            "runs (plain / tracked wall s): "
            + ", ".join(f"{b['wall']:.2f} / {t['wall']:.2f}" for b, t in zip(bases, trackeds))
        )
    n = args.records
    print(
        f"{n} records, population {args.population}, {args.candidate_seconds:.3f} s per candidate, "
        f"{args.models} models x {args.layers} layers (per-layer attn/MLP genes)"
    )
    print(f"without tracker: {base['wall']:.2f} s")
    print(f"with tracker:    {tracked['wall']:.2f} s  (loop {tracked['loop']:.2f} s + close {tracked['close']:.2f} s)")
    print(f"overhead:        {overhead:+.1f} %")
    print(
        f"start/on_record/on_generation blocked the loop {(tracked['hook_seconds'] - tracked['close']) * 1000:.1f} ms "
        f"in total (slowest on_record+on_generation: {tracked['hook_max'] * 1000:.2f} ms)"
    )
    print(
        f"background worker: {tracked['worker_seconds']:.2f} s wall, {tracked['worker_cpu_seconds']:.2f} s CPU "
        f"({1000 * tracked['worker_cpu_seconds'] / n:.1f} ms CPU per record, MLflow import and store creation "
        f"included); {int(tracked['logged'])} child runs, {int(tracked['failures'])} failures"
    )


if __name__ == "__main__":
    main()

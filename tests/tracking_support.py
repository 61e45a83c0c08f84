"""A fake search for the tracking tests: a run config shaped like ResolvedRun.to_dict(), 20 records
over 3 generations, a run dir with a migrated store, and a driver stand-in that feeds a Tracker."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from evomerge.search.genome import make_genome
from evomerge.search.record import CandidateRecord
from evomerge.search.rundir import RunDir
from evomerge.search.space import load_space
from evomerge.tracking import Tracker
from evomerge.tracking.store import DB_FILE

LAYERS = 4
GENERATIONS = (8, 8, 4)
FAILED = 5


def ps_space() -> dict:
    return {
        "models": ["/m/reverse", "/m/sort"],
        "base_model": "/m/base",
        "method": "ties",
        "parameters": {"weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.2, "high": 1.0}},
        "granularity": "layer",
        "split_attn_mlp": True,
    }


def run_config(name: str = "tracking-test") -> dict:
    """Shaped like ResolvedRun.to_dict()."""
    return {
        "name": name,
        "zoo": None,
        "search_space": load_space(ps_space()).model_dump(mode="json"),
        "objectives": [
            {
                "task": "zoo_reverse",
                "metric": "acc",
                "split": "search",
                "limit": 50,
                "subset_seed": None,
                "direction": None,
                "weight": 1.0,
                "reference": None,
                "name": "reverse",
            },
            {
                "task": "zoo_sort",
                "metric": "acc",
                "split": "search",
                "limit": 50,
                "subset_seed": None,
                "direction": None,
                "weight": 1.0,
                "reference": None,
                "name": "sort",
            },
        ],
        "include_paths": [],
        "optimizer": {"name": "nsga2", "population": 8, "budget": 20, "sigma": 0.25, "seed": 7},
        "runtime": {
            "workers": 2,
            "ray_address": None,
            "gpus_per_worker": 0.0,
            "cpus_per_worker": 1.0,
            "timeout": 600.0,
            "time_limit": None,
            "backend": "fast",
            "device": None,
        },
        "tracking": {"uri": None, "experiment": "evomerge"},
    }


def make_records(seed: int = 0) -> list[CandidateRecord]:
    """20 candidates over 3 generations (8, 8, 4), 2 objectives, candidate 5 failed."""
    genome = make_genome(load_space(ps_space()), num_layers=LAYERS)
    rng = np.random.default_rng(seed)
    records, cid, now = [], 0, time.time() - 100
    for generation, size in enumerate(GENERATIONS):
        for _ in range(size):
            x = rng.random(genome.dim)
            recipe = genome.decode(x)
            failed = cid == FAILED
            records.append(
                CandidateRecord.from_json(
                    {
                        "id": cid,
                        "generation": generation,
                        "genome": [round(float(v), 8) for v in x],
                        "recipe_hash": recipe.content_hash(),
                        "recipe": recipe.to_dict(),
                        "objectives": {}
                        if failed
                        else {"reverse": round(float(rng.random()), 4), "sort": round(float(rng.random()), 4)},
                        "status": "failed" if failed else "ok",
                        "reason": "worker lost: out of memory" if failed else None,
                        "worker": f"w{cid % 2}",
                        "seconds": 1.5,
                        "materialize_seconds": 0.5,
                        "score_seconds": 1.0,
                        "cached": False,
                        "attempts": 2 if failed else 1,
                        "time": now + cid,
                    }
                )
            )
            cid += 1
    return records


def make_run_dir(path: Path, empty_store: Path | None = None) -> tuple[RunDir, dict, list[CandidateRecord]]:
    run_dir = RunDir(path)
    config = run_config()
    run_dir.write_config(config)
    if empty_store is not None:
        source, target = sqlite3.connect(empty_store), sqlite3.connect(path / DB_FILE)
        source.backup(target)
        source.close()
        target.close()
    return run_dir, config, make_records()


def drive(
    tracker: Tracker, run_dir: RunDir, records: list[CandidateRecord], *, resume: bool = False, close: bool = True
) -> None:
    """What the search driver does: append, on_record, and on_generation after each generation."""
    tracker.start(resume=resume)
    for i, record in enumerate(records):
        run_dir.append(record)
        tracker.on_record(record)
        last = i + 1 == len(records) or records[i + 1].generation != record.generation
        if last:
            tracker.on_generation(record.generation)
    if close:
        tracker.close()

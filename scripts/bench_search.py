#!/usr/bin/env python
"""Search quality and throughput on the toy zoo, side by side in one run.

Quality: CMA-ES, NSGA-II and random search over configs/zoo-ps-*.yaml's space at equal budgets and
several seeds (in-process workers, so runs are deterministic): best mean accuracy on the search split,
hypervolume, the candidates CMA-ES needed to reach random search's final best, and the best evolved
merge's held-out test scores next to hand-set baselines (uniform linear, task arithmetic, TIES at
default parameters) and to each specialist.

Throughput: candidates per minute with the in-process executor and with 1 and 2 Ray workers, and the
fraction of worker time spent idle.

    .venv/bin/python scripts/bench_search.py [--budgets 60 200] [--seeds 0 1 2] [--throughput-budget 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.eval.evaluator import CandidateEvaluator  # noqa: E402
from evomerge.eval.tasks import Objective  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.runtime.executor import make_executor  # noqa: E402
from evomerge.search.config import load_run_config  # noqa: E402
from evomerge.search.driver import Search  # noqa: E402
from evomerge.search.report import RunReport  # noqa: E402
from evomerge.search.rundir import RunDir  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402


def run_search(config: str, run_dir: Path, overrides: list[str], budget: int):
    run = load_run_config(ROOT / "configs" / config, overrides)
    executor = make_executor(run)
    try:
        started = time.perf_counter()
        summary = Search(run, RunDir(run_dir), executor, budget=budget).execute()
        wall = time.perf_counter() - started
        idle = executor.idle_fraction()
    finally:
        executor.shutdown()
    return run, summary, wall, idle


def mean_acc(objectives: dict, labels: list[str]) -> float:
    return float(np.mean([objectives[k] for k in labels]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["cma", "nsga2", "random"])
    parser.add_argument("--throughput-budget", type=int, default=32)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    zoo = build_zoo(default_zoo_dir(0), 0, progress=False).parent
    os.environ["EVOMERGE_ZOO_DIR"] = str(zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    include = str(zoo / manifest["include_path"])
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    out: dict = {"quality": [], "throughput": []}
    budget = max(args.budgets)
    try:
        # --- quality: one run per (optimizer, seed) at the largest budget; smaller budgets are its prefix
        for name in args.optimizers:
            for seed in args.seeds:
                config = "zoo-ps-cma.yaml" if name == "cma" else "zoo-ps-nsga2.yaml"
                overrides = [f"optimizer.name={name}", f"optimizer.seed={seed}", "runtime.workers=0"]
                run, summary, wall, _ = run_search(config, work / f"{name}-{seed}", overrides, budget)
                report = RunReport.load(work / f"{name}-{seed}")
                labels = report.labels
                curve = []
                best = -1.0
                for record in report.records:
                    if record["status"] == "ok":
                        best = max(best, mean_acc(record["objectives"], labels))
                    curve.append(best)
                entry = {"optimizer": name, "seed": seed, "wall_s": wall, "curve": curve, "budgets": {}}
                for b in args.budgets:
                    prefix = report.records[:b]
                    ok = [r for r in prefix if r["status"] == "ok"]
                    entry["budgets"][b] = {"best_mean_acc": curve[min(b, len(curve)) - 1],
                                           "hypervolume": report.hypervolume(ok)}
                entry["best_recipe"] = max(report.ok, key=lambda r: mean_acc(r["objectives"], labels))["recipe"]
                out["quality"].append(entry)
                print(f"{name} seed {seed}: best mean acc {curve[-1]:.3f} after {len(curve)} in {wall:.0f}s", flush=True)

        # --- held-out test scores: specialists, hand-set baselines, best evolved merges
        test = CandidateEvaluator([Objective(task=t, metric="acc", split="test") for t in manifest["tasks"].values()],
                                  include_paths=[include])
        base = str(zoo / manifest["base"])
        models = {k: str(zoo / v) for k, v in manifest["models"].items()}
        rows = {}
        for skill, path in models.items():
            rows[f"specialist {skill}"] = test.evaluate_checkpoint(path).objectives
        baselines = {
            "linear (uniform)": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models.values()]},
            "task arithmetic (w=1)": {"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models.values()]},
            "task arithmetic (w=0.5)": {"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models.values()]},
            "TIES (defaults: w=1, density=0.5)": {"merge_method": "ties", "base_model": base, "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models.values()]},
        }
        for label, recipe in baselines.items():
            rows[label] = test.evaluate(Recipe.from_dict({**recipe, "dtype": "float32"})).objectives
        for name in args.optimizers:
            best_entry = max((q for q in out["quality"] if q["optimizer"] == name), key=lambda q: q["curve"][-1])
            rows[f"best {name} (seed {best_entry['seed']}, {budget} cand.)"] = test.evaluate(Recipe.from_dict(best_entry["best_recipe"])).objectives
        out["test"] = rows

        # --- throughput
        if not args.skip_throughput:
            for workers in (0, 1, 2):
                overrides = ["optimizer.name=nsga2", "optimizer.seed=0", f"runtime.workers={workers}", "optimizer.population=8"]
                _, summary, wall, idle = run_search("zoo-ps-nsga2.yaml", work / f"tp-{workers}", overrides, args.throughput_budget)
                out["throughput"].append({"workers": workers, "candidates": summary.evaluated, "wall_s": wall,
                                          "per_minute": 60 * summary.evaluated / wall, "idle_fraction": idle})
                print(f"throughput workers={workers}: {60 * summary.evaluated / wall:.1f}/min idle {idle:.0%}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_tables(out, args, list(manifest["tasks"].values()), models)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


def print_tables(out: dict, args, tasks: list[str], models: dict) -> None:
    print(f"\n# bench_search · {os.cpu_count()} cores · seeds {args.seeds}\n")
    print("| optimizer | budget | best mean acc (search), mean ± sd over seeds | hypervolume, mean | ")
    print("|---|---:|---:|---:|")
    for name in args.optimizers:
        entries = [q for q in out["quality"] if q["optimizer"] == name]
        for b in args.budgets:
            bests = [q["budgets"][b]["best_mean_acc"] for q in entries]
            hvs = [q["budgets"][b]["hypervolume"] for q in entries]
            print(f"| {name} | {b} | {np.mean(bests):.3f} ± {np.std(bests):.3f} | {np.mean(hvs):.4f} |")
    randoms = [q for q in out["quality"] if q["optimizer"] == "random"]
    if randoms and any(q["optimizer"] == "cma" for q in out["quality"]):
        target = float(np.mean([q["curve"][-1] for q in randoms]))
        needed = []
        for q in (q for q in out["quality"] if q["optimizer"] == "cma"):
            hit = next((i + 1 for i, v in enumerate(q["curve"]) if v >= target), None)
            needed.append(hit)
        print(f"\nCMA-ES candidates to reach random search's {max(args.budgets)}-candidate best ({target:.3f}): {needed}")
    print("\n| held-out test split | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for label, values in out["test"].items():
        cells = [values[f"{t}/acc"] for t in tasks]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cells) + f" | {np.mean(cells):.3f} |")
    if out["throughput"]:
        print("\n| executor | candidates/min | idle worker time |")
        print("|---|---:|---:|")
        for t in out["throughput"]:
            label = "in-process" if t["workers"] == 0 else f"Ray, {t['workers']} worker(s)"
            print(f"| {label} | {t['per_minute']:.1f} | {t['idle_fraction']:.0%} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Search quality and throughput on the toy zoo, side by side in one run.

Quality: CMA-ES (objectives summed, and ``cma-worst``: the worst objective), NSGA-II and random
search over configs/zoo-ps-*.yaml's space at equal budgets and several seeds (in-process workers, so
runs are deterministic): best mean accuracy and best worst-skill accuracy on the search split,
hypervolume, the candidates CMA-ES needed to reach random search's final best, and the best evolved
merges' held-out test scores next to the hand-set merges (``evomerge.zoo.quality.HAND_SET_MERGES``),
the base and each specialist, with the gain retention (merge - base) / (specialist - base) per skill.

With ``--config zoo-synergy.yaml`` (objective: the synergy task) the held-out table adds the synergy
task as a column and the hand-set merges merge the synergy pair. ``--zoo-seed N`` runs on the zoo of
another seed (generalization).

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

from evomerge.runtime import make_executor  # noqa: E402
from evomerge.search.config import load_run_config  # noqa: E402
from evomerge.search.driver import Search  # noqa: E402
from evomerge.search.report import RunReport  # noqa: E402
from evomerge.search.rundir import RunDir  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402
from evomerge.zoo.compare import compare  # noqa: E402


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


def worst_acc(objectives: dict, labels: list[str]) -> float:
    return float(np.min([objectives[k] for k in labels]))


OPTIMIZER_OVERRIDES = {
    "cma": ["optimizer.name=cma"],
    "cma-worst": ["optimizer.name=cma", "optimizer.scalarize=worst"],
    "nsga2": ["optimizer.name=nsga2"],
    "random": ["optimizer.name=random"],
    "gradient": [],  # configs/zoo-ps-gradient.yaml: deterministic (no seed), its own budget of scored points
}


DEFAULT_CONFIGS = {"cma": "zoo-ps-cma.yaml", "cma-worst": "zoo-ps-cma.yaml", "gradient": "zoo-ps-gradient.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--optimizers", nargs="+", default=["cma", "cma-worst", "nsga2", "random"], choices=sorted(OPTIMIZER_OVERRIDES)
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config override for the quality runs (as `evomerge search --set`)",
    )
    parser.add_argument("--throughput-budget", type=int, default=32)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--zoo-seed", type=int, default=0, help="build (or reuse) the zoo of this seed")
    parser.add_argument(
        "--config",
        help="run config for every optimizer (default: configs/zoo-ps-cma.yaml for "
        "CMA-ES, configs/zoo-ps-nsga2.yaml for the others)",
    )
    args = parser.parse_args()

    zoo = build_zoo(default_zoo_dir(args.zoo_seed), args.zoo_seed, progress=False).parent
    os.environ["EVOMERGE_ZOO_DIR"] = str(zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    out: dict = {"quality": [], "throughput": []}
    budget = max(args.budgets)
    try:
        # --- quality: one run per (optimizer, seed) at the largest budget; smaller budgets are its prefix
        for name in args.optimizers:
            for seed in args.seeds[:1] if name == "gradient" else args.seeds:
                config = args.config or DEFAULT_CONFIGS.get(name, "zoo-ps-nsga2.yaml")
                if name == "gradient" and args.config:
                    config = args.config.replace(".yaml", "-gradient.yaml")
                overrides = OPTIMIZER_OVERRIDES[name] + [f"optimizer.seed={seed}", "runtime.workers=0", *args.overrides]
                run, summary, wall, _ = run_search(
                    config, work / f"{name}-{seed}", overrides, None if name == "gradient" else budget
                )
                report = RunReport.load(work / f"{name}-{seed}")
                labels = report.labels
                if any(d != "maximize" for d in report.directions):
                    sys.exit(
                        f"bench_search compares accuracies: every objective must be maximized, got "
                        f"{dict(zip(labels, report.directions))} (use `evomerge search` + `evomerge front` for others)"
                    )
                out["searched_tasks"] = [label.split("/")[0] for label in labels]
                curve, worst_curve = [], []
                best = best_worst = -1.0
                for record in report.records:
                    if record.ok:
                        best = max(best, mean_acc(record.objectives, labels))
                        best_worst = max(best_worst, worst_acc(record.objectives, labels))
                    curve.append(best)
                    worst_curve.append(best_worst)
                entry = {
                    "optimizer": name,
                    "seed": seed,
                    "wall_s": wall,
                    "curve": curve,
                    "worst_curve": worst_curve,
                    "budgets": {},
                }
                for b in args.budgets:
                    prefix = report.records[:b]
                    ok = [r for r in prefix if r.has_all(labels)]
                    entry["budgets"][b] = {
                        "best_mean_acc": curve[min(b, len(curve)) - 1],
                        "best_worst_acc": worst_curve[min(b, len(worst_curve)) - 1],
                        "hypervolume": report.hypervolume(ok),
                    }
                entry["best_recipe"] = max(report.ok, key=lambda r: mean_acc(r.objectives, labels)).recipe
                entry["best_worst_recipe"] = max(
                    report.ok, key=lambda r: (worst_acc(r.objectives, labels), mean_acc(r.objectives, labels))
                ).recipe
                out["quality"].append(entry)
                print(
                    f"{name} seed {seed}: best mean acc {curve[-1]:.3f}, best worst-skill acc {worst_curve[-1]:.3f} "
                    f"after {len(curve)} in {wall:.0f}s",
                    flush=True,
                )

        # --- held-out test scores: base, specialists, hand-set merges, best evolved merges
        searched = out.get("searched_tasks") or list(manifest["tasks"].values())
        synergy = manifest["synergy"]["task"] in searched
        # baselines merge the searched skills' specialists (for the synergy task: its pair)
        skills = (
            manifest["synergy"]["skills"] if synergy else [k for k, t in manifest["tasks"].items() if t in searched]
        )
        picks = {}
        for name in args.optimizers:
            entries = [q for q in out["quality"] if q["optimizer"] == name]
            if name in ("cma-worst", "gradient") or (synergy and name == "cma"):
                # the optimizer the targets are about: every seed's pick, not only the luckiest seed's
                for q in entries:
                    label = (
                        f"gradient fit, best of its {len(q['curve'])} scored points"
                        if name == "gradient"
                        else f"best worst-skill, {name} (seed {q['seed']}, {budget} cand.)"
                    )
                    picks[label] = q["best_worst_recipe"]
                continue
            by_mean = max(entries, key=lambda q: q["curve"][-1])
            picks[f"best mean, {name} (seed {by_mean['seed']}, {budget} cand.)"] = by_mean["best_recipe"]
            by_worst = max(entries, key=lambda q: q["worst_curve"][-1])
            picks[f"best worst-skill, {name} (seed {by_worst['seed']}, {budget} cand.)"] = by_worst["best_worst_recipe"]
        comparison = compare(zoo / "zoo.json", picks, skills=skills, synergy=synergy)
        out["test"] = comparison.to_dict()

        # --- throughput
        if not args.skip_throughput:
            for workers in (0, 1, 2):
                overrides = [
                    "optimizer.name=nsga2",
                    "optimizer.seed=0",
                    f"runtime.workers={workers}",
                    "optimizer.population=8",
                ]
                _, summary, wall, idle = run_search(
                    "zoo-ps-nsga2.yaml", work / f"tp-{workers}", overrides, args.throughput_budget
                )
                out["throughput"].append(
                    {
                        "workers": workers,
                        "candidates": summary.evaluated,
                        "wall_s": wall,
                        "per_minute": 60 * summary.evaluated / wall,
                        "idle_fraction": idle,
                    }
                )
                print(
                    f"throughput workers={workers}: {60 * summary.evaluated / wall:.1f}/min idle {idle:.0%}", flush=True
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_tables(out, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


def print_tables(out: dict, args) -> None:
    print(f"\n# bench_search · {os.cpu_count()} cores · seeds {args.seeds} · overrides {args.overrides}\n")
    print(
        "| optimizer | budget | best mean acc (search), mean ± sd over seeds "
        "| best worst-skill acc (search), mean ± sd | hypervolume, mean | wall s per run, mean |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.optimizers:
        entries = [q for q in out["quality"] if q["optimizer"] == name]
        for b in args.budgets:
            bests = [q["budgets"][b]["best_mean_acc"] for q in entries]
            worsts = [q["budgets"][b]["best_worst_acc"] for q in entries]
            hvs = [q["budgets"][b]["hypervolume"] for q in entries]
            scored = min(b, len(entries[0]["curve"])) if entries else b
            print(
                f"| {name} | {scored} | {np.mean(bests):.3f} ± {np.std(bests):.3f} "
                f"| {np.mean(worsts):.3f} ± {np.std(worsts):.3f} | {np.mean(hvs):.4f} "
                f"| {np.mean([q['wall_s'] for q in entries]):.0f} |"
            )
            if scored < b:
                break
    randoms = [q for q in out["quality"] if q["optimizer"] == "random"]  # CMA-ES (summed) vs random, on mean acc
    if randoms and any(q["optimizer"] == "cma" for q in out["quality"]):
        target = float(np.mean([q["curve"][-1] for q in randoms]))
        needed = []
        for q in (q for q in out["quality"] if q["optimizer"] == "cma"):
            hit = next((i + 1 for i, v in enumerate(q["curve"]) if v >= target), None)
            needed.append(hit)
        print(
            f"\nCMA-ES candidates to reach random search's {max(args.budgets)}-candidate best ({target:.3f}): {needed}"
        )
    if randoms and any(q["optimizer"] == "cma-worst" for q in out["quality"]):  # the same on the weakest skill
        target = float(np.median([q["worst_curve"][-1] for q in randoms]))
        needed = [
            next((i + 1 for i, v in enumerate(q["worst_curve"]) if v >= target), None)
            for q in out["quality"]
            if q["optimizer"] == "cma-worst"
        ]
        print(
            f"\nCMA-ES (worst) candidates to reach random search's {max(args.budgets)}-candidate best worst-skill acc "
            f"(median over seeds, {target:.3f}): {needed}"
        )
    randoms = {q["seed"]: q for q in out["quality"] if q["optimizer"] == "random"}
    nsga = [q for q in out["quality"] if q["optimizer"] == "nsga2"]
    if randoms and nsga:
        wins = [
            (q["seed"], b, q["budgets"][b]["hypervolume"], randoms[q["seed"]]["budgets"][b]["hypervolume"])
            for q in nsga
            if q["seed"] in randoms
            for b in args.budgets
        ]
        print(
            "\nNSGA-II vs random hypervolume (seed, budget, nsga2, random): "
            + ", ".join(f"({s}, {b}, {h:.4f}, {r:.4f})" for s, b, h, r in wins)
            + f" -> NSGA-II ahead in {sum(h > r for _, _, h, r in wins)} of {len(wins)}"
        )
    test = out["test"]
    skills = [k for k in test["tasks"] if k in next(iter(test["gain_retention"].values()))]
    print(
        f"\nHeld-out test split, acc; kept = gain retention (merge - base) / (specialist - base). "
        f"Best hand-set merge (by worst kept): {test['best_hand_set']}."
    )
    print(
        "\n| test split | "
        + " | ".join(test["tasks"])
        + " | "
        + " | ".join(f"kept {s}" for s in skills)
        + " | kept, worst |"
    )
    print("|---|" + "---:|" * (len(test["tasks"]) + len(skills) + 1))
    for label, scores in test["scores"].items():
        kept = test["gain_retention"].get(label)
        cells = [f"{scores[t]:.3f}" for t in test["tasks"]]
        cells += [f"{kept[s]:.0%}" for s in skills] if kept else [""] * len(skills)
        cells.append(f"{min(kept.values()):.0%}" if kept and not label.startswith("specialist") else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if out["throughput"]:
        print("\n| executor | candidates/min | idle worker time |")
        print("|---|---:|---:|")
        for t in out["throughput"]:
            label = "in-process" if t["workers"] == 0 else f"Ray, {t['workers']} worker(s)"
            print(f"| {label} | {t['per_minute']:.1f} | {t['idle_fraction']:.0%} |")


if __name__ == "__main__":
    main()

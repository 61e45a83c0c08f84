#!/usr/bin/env python
"""Cheap fitness (issue 12): rank fidelity of item subsets, and what a multi-fidelity search saves.

1. Rank fidelity. A CMA-ES search (configs/zoo-ps-cma.yaml, 200 candidates, in-process) is run on a zoo
   seed; its run dir keeps every candidate's value on every search item (``responses.jsonl``). For
   subsets of k of the 100 items per skill (20 seeded draws per k), each candidate's subset score is
   compared with its full score by Kendall's tau-b over the run's distinct candidates: per skill, and
   for the weakest-skill score the search ranks by. Target: tau >= 0.8 at a fraction of the items.
2. Cost to quality. The same full-fidelity search, and a multi-fidelity one (the same config with
   ``screen: K`` on every objective and ``optimizer.promote``, ``--screened-budget`` candidates): after
   every record, the run's pick (the full-fidelity candidate with the best weakest-skill search
   accuracy, ties by the mean) is scored on the test split, and the items scored so far are counted
   (every item of every non-cached candidate, promotions included). Reported: the items at which each
   run's pick first comes within 2 points (weakest-skill gain retention) of the full search's final
   pick, as a share of the full search's items. Target: <= 1/5.

    .venv/bin/python scripts/bench_fitness.py [--zoo-seeds 0 1] [--sizes 5 10 20 40] [--json out.json]
        [--screen 20] [--promote 0.125] [--screened-budget 400]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.search.report import RunReport  # noqa: E402
from evomerge.search.rundir import RunDir  # noqa: E402
from evomerge.zoo.compare import compare  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_methods import OBJECTIVES, over_zoo_seeds, run  # noqa: E402

WITHIN = 0.02
"""How close (weakest-skill gain retention) a pick must come to the full search's final pick."""


def fidelity(run_dir: Path, sizes: list[int], draws: int = 20) -> dict:
    responses = RunDir(run_dir).responses()  # distinct recipes only: cached duplicates have no line
    labels = sorted(next(iter(responses.values())))
    table = {label: np.array([responses[c][label] for c in sorted(responses)]) for label in labels}  # (cands, items)
    n_items = min(v.shape[1] for v in table.values())
    full = {label: v.mean(1) for label, v in table.items()}
    full_worst = np.min(np.stack(list(full.values())), axis=0)
    rng = np.random.default_rng(0)
    out: dict = {"candidates": len(responses), "items": n_items, "sizes": {}}
    for k in sizes:
        taus: dict[str, list[float]] = {label: [] for label in [*labels, "weakest skill"]}
        for _ in range(draws):
            subset = {label: v[:, rng.choice(v.shape[1], k, replace=False)].mean(1) for label, v in table.items()}
            for label in labels:
                taus[label].append(float(kendalltau(subset[label], full[label]).statistic))
            worst = np.min(np.stack(list(subset.values())), axis=0)
            taus["weakest skill"].append(float(kendalltau(worst, full_worst).statistic))
        out["sizes"][k] = {label: (float(np.mean(v)), float(np.std(v))) for label, v in taus.items()}
    return out


def trajectory(run_dir: Path) -> list[tuple[int, dict]]:
    """(items scored so far, the pick's recipe) at every change of pick, in the order the records were
    written, and once more at the run's end (its final pick at its full cost)."""
    report = RunReport.load(run_dir)
    responses = RunDir(run_dir).responses()
    spent, key, out = 0, None, []
    for record in report.records:  # file order: the order the search produced them
        if record.ok and not record.cached:
            spent += sum(len(v) for v in responses.get(record.id, {}).values())
        if record.has_all(report.labels):
            values = [record.objectives[k] for k in report.labels]
            if key is None or (min(values), sum(values)) > key:
                key = (min(values), sum(values))
                out.append((spent, dict(record.recipe or {})))
    out.append((spent, out[-1][1]))
    return out


def cost_to_quality(zoo: Path, runs: dict[str, Path]) -> dict:
    """Each run's pick trajectory scored on the test split; the items each needs to come within WITHIN
    of the full search's final pick (the first entry of ``runs``)."""
    paths = {label: trajectory(path) for label, path in runs.items()}
    recipes = {f"{label} #{i}": recipe for label, points in paths.items() for i, (_, recipe) in enumerate(points)}
    comparison = compare(zoo / "zoo.json", recipes, hand_set=False)
    kept = {row: min(comparison.retention(row).values()) for row in recipes}
    out: dict = {}
    for label, points in paths.items():
        curve = [(items, kept[f"{label} #{i}"]) for i, (items, _) in enumerate(points)]
        out[label] = {"items": curve[-1][0], "final": curve[-1][1], "curve": curve}
    reference = out[next(iter(runs))]
    for result in out.values():
        reached = [items for items, value in result["curve"] if value >= reference["final"] - WITHIN]
        result["reached_at"] = reached[0] if reached else None
        result["share_of_full"] = reached[0] / reference["items"] if reached else None
    return out


def print_cost(seed: int, r: dict) -> None:
    print(
        f"\n#### zoo seed {seed}: items scored until the pick comes within {WITHIN * 100:.0f} points of the "
        "full search's final pick (test split)\n"
    )
    print(
        "| search | final pick: weakest skill kept | items scored in all | items until within 2 points | share of the full search's items |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, result in r.items():
        reached, share = result["reached_at"], result["share_of_full"]
        cells = [f"{result['final']:.0%}", str(result["items"])]
        cells += [str(reached), f"{share:.1%}"] if reached is not None else ["not reached", ""]
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_table(seed: int, r: dict) -> None:
    labels = list(next(iter(r["sizes"].values())))
    print(
        f"\n#### zoo seed {seed}: Kendall tau-b of the k-item score vs the {r['items']}-item score, {r['candidates']} candidates\n"
    )
    print("| k items (share) | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for k, taus in r["sizes"].items():
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in taus.values()]
        print(f"| {k} ({k / r['items']:.0%}) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--screen", type=int, default=20, help="items per skill a candidate is screened on")
    parser.add_argument("--promote", type=float, default=0.125, help="share of each generation scored in full")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--screened-budget", type=int, default=400)
    parser.add_argument("--skip-rank", action="store_true", help="only the cost-to-quality part")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    def one(zoo: Path, manifest: dict, work: Path) -> dict:
        run("zoo-ps-cma.yaml", work / "full", [])
        screened = [
            f"objectives={json.dumps([{**o, 'screen': args.screen} for o in OBJECTIVES])}",
            f"optimizer.promote={args.promote}",
            f"optimizer.population={args.population}",
            f"optimizer.budget={args.screened_budget}",
        ]
        run("zoo-ps-cma.yaml", work / "screened", screened)
        label = f"CMA-ES, screen {args.screen} items, promote {args.promote:g}, {args.screened_budget} cand."
        out = {
            "cost": cost_to_quality(zoo, {"CMA-ES, full fidelity, 200 cand.": work / "full", label: work / "screened"})
        }
        if not args.skip_rank:
            out["rank"] = fidelity(work / "full", args.sizes)
        return out

    def show(seed: int, r: dict) -> None:
        if "rank" in r:
            print_table(seed, r["rank"])
        print_cost(seed, r["cost"])

    over_zoo_seeds(args.zoo_seeds, "bench-fitness-", one, show, args.json)


if __name__ == "__main__":
    main()

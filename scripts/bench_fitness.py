#!/usr/bin/env python
"""Rank fidelity of cheap fitness: how well a candidate's score on a small item subset orders candidates
as its score on all items does (issue 12's first measurement; the multi-fidelity search itself is not
built yet).

A CMA-ES search (configs/zoo-ps-cma.yaml, 200 candidates, in-process) is run on a zoo seed; its run dir
keeps every candidate's value on every search item (``responses.jsonl``). For subsets of k of the 100
items per skill (20 seeded draws per k), each candidate's subset score is compared with its full score
by Kendall's tau-b over the run's distinct candidates: per skill, and for the weakest-skill score the
search ranks by. Target (issue 12): tau >= 0.8 at a fraction of the items.

    .venv/bin/python scripts/bench_fitness.py [--zoo-seeds 0 1] [--sizes 5 10 20 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.search.rundir import RunDir  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_methods import over_zoo_seeds, run  # noqa: E402


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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    def one(zoo: Path, manifest: dict, work: Path) -> dict:
        run("zoo-ps-cma.yaml", work / "run", [])
        return fidelity(work / "run", args.sizes)

    over_zoo_seeds(args.zoo_seeds, "bench-fitness-", one, print_table, args.json)


if __name__ == "__main__":
    main()

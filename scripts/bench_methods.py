#!/usr/bin/env python
"""Every merging technique evomerge has, in one table: held-out gain retention on the toy zoo.

Three skills (the zoo's latin, greek and cyrillic specialists), test split, gain retention
(merge - base) / (specialist - base) per skill, plus how many candidates each technique scored and its
wall time on this machine (in-process, one process):

- hand-set merges (linear, task arithmetic λ 0.5 / 1, TIES, DARE-TIES; mergekit's defaults otherwise);
- data-aware hand-set merges: Fisher (floor 1e-6) and RegMean (alpha 0.9), each specialist's statistics
  on its own skill's 100 search items (as published);
- a sweep of task arithmetic's λ (weight 1 for each specialist; 9 grid points + the quadratic fit's pick);
- a greedy soup of the three specialists (ranked by the weakest skill);
- searches at equal budgets (200 candidates): CMA-ES and NSGA-II over per-layer task-arithmetic weights
  (24 genes, configs/zoo-ps-cma.yaml and zoo-ps-nsga2.yaml), CMA-ES over RegMean's alpha and weights
  (zoo-ps-regmean.yaml) and over Fisher weights (zoo-ps-fisher.yaml);
- the gradient baseline (AdaMerging-style, configs/zoo-ps-gradient.yaml: 96 genes, 11 points scored).

Searches are picked the same way: the candidate with the best weakest-skill accuracy on the search
split (ties: best mean). Data-aware searches start from an empty statistics cache, so their wall time
includes computing the statistics. The soup group (three `greek` fine-tunes differing in data order)
gets its own rows: uniform and greedy soups, greek column only.

    .venv/bin/python scripts/bench_methods.py [--zoo-seeds 0 1] [--json out.json] [--budget 200]
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
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.runtime import make_executor  # noqa: E402
from evomerge.search.config import load_run_config  # noqa: E402
from evomerge.search.driver import Search  # noqa: E402
from evomerge.search.picks import pick  # noqa: E402
from evomerge.search.report import RunReport  # noqa: E402
from evomerge.search.rundir import RunDir  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402
from evomerge.zoo.compare import compare  # noqa: E402

SKILLS = ("latin", "greek", "cyrillic")
OBJECTIVES = [{"task": f"zoo_{s}", "metric": "acc", "split": "search", "limit": 100} for s in SKILLS]


def run(config: str, run_dir: Path, overrides: list[str]) -> tuple[RunReport, float]:
    """A search in-process; its wall time (statistics of data-aware methods included: fresh cache)."""
    os.environ["EVOMERGE_CACHE"] = str(run_dir.parent / f"cache-{run_dir.name}")
    resolved = load_run_config(ROOT / "configs" / config, ["runtime.workers=0", *overrides])
    executor = make_executor(resolved)
    try:
        started = time.perf_counter()
        summary = Search(resolved, RunDir(run_dir), executor).execute()
        wall = time.perf_counter() - started
    finally:
        executor.shutdown()
    if summary.stopped not in ("done", "budget"):
        sys.exit(f"{config}: stopped with {summary.stopped!r}")
    return RunReport.load(run_dir), wall


def weakest_skill_pick(report: RunReport) -> dict:
    """The recipe of the candidate with the best weakest-skill search accuracy (ties: best mean)."""
    ok = report.ok  # full-fidelity records only (a multi-fidelity run also has screened ones)
    best = max(ok, key=lambda r: (min(r.objectives.values()), sum(r.objectives.values())))
    return dict(best.recipe or {})


def space_file(work: Path, name: str, space: dict) -> str:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def data_aware(zoo: Path, manifest: dict, method: str, params: dict) -> dict:
    models = {s: str(zoo / manifest["models"][s]) for s in SKILLS}
    items = [{"task": f"zoo_{s}", "split": "search", "limit": 100, "models": [models[s]]} for s in SKILLS]
    return {
        "merge_method": method,
        "models": [{"model": m} for m in models.values()],
        "parameters": params,
        "dtype": "float32",
        "data": {"include_path": [str(zoo / manifest["include_path"])], "items": items},
    }


def one_seed(zoo: Path, manifest: dict, work: Path, budget: int) -> dict:
    recipes: dict[str, dict] = {
        "Fisher (own items)": data_aware(zoo, manifest, "fisher", {"fisher_floor": 1e-6}),
        "RegMean α=0.9 (own items)": data_aware(zoo, manifest, "regmean", {"alpha": 0.9}),
    }
    cost: dict[str, tuple[int, float]] = {}
    objectives = "objectives=" + json.dumps(OBJECTIVES)
    lam_space = {
        "kind": "ps",
        "models": list(SKILLS),
        "base_model": "base",
        "method": "task_arithmetic",
        "parameters": {"weight": 1.0, "lambda": {"low": 0.0, "high": 2.0}},
    }
    searches = [
        (
            "sweep of λ (task arithmetic, 9 points + fit)",
            "zoo-sweep.yaml",
            [f"search_space={space_file(work, 'lambda', lam_space)}", objectives, "optimizer.grid=9"],
            "optimizer",
        ),
        (
            "greedy soup of the specialists",
            "zoo-soup.yaml",
            [
                "search_space="
                + space_file(
                    work,
                    "soup3",
                    {
                        "kind": "ps",
                        "models": list(SKILLS),
                        "method": "linear",
                        "parameters": {"weight": {"low": 0, "high": 1}},
                    },
                ),
                objectives,
                "optimizer.scalarize=worst",
            ],
            "optimizer",
        ),
        ("gradient, 96 genes (zoo-ps-gradient)", "zoo-ps-gradient.yaml", [], "optimizer"),
        (
            f"CMA-ES, task arithmetic 24 genes, {budget} cand.",
            "zoo-ps-cma.yaml",
            [f"optimizer.budget={budget}"],
            "weakest",
        ),
        (
            f"NSGA-II, task arithmetic 24 genes, {budget} cand.",
            "zoo-ps-nsga2.yaml",
            [f"optimizer.budget={budget}"],
            "weakest",
        ),
        (
            f"CMA-ES, RegMean alpha + weights, {budget} cand.",
            "zoo-ps-regmean.yaml",
            [f"optimizer.budget={budget}"],
            "weakest",
        ),
        (
            f"CMA-ES, Fisher weights, {budget} cand.",
            "zoo-ps-regmean.yaml",
            [f"optimizer.budget={budget}", "search_space=../search_spaces/zoo-ps-fisher.yaml"],
            "weakest",
        ),
    ]
    for n, (label, config, overrides, how) in enumerate(searches):
        print(f"  {label} ...", file=sys.stderr, flush=True)
        report, wall = run(config, work / f"run{n}", overrides)
        chosen = dict(pick(report, "optimizer").recipe or {}) if how == "optimizer" else weakest_skill_pick(report)
        recipes[label] = chosen
        cost[label] = (report.count, wall)
    comparison = compare(zoo / "zoo.json", recipes)
    out = {"test": comparison.to_dict(), "cost": cost}
    # the soup group: fine-tunes of one skill (greek column only)
    skill, members = next(iter(manifest["soups"].items()))
    soup_recipes = {}
    for name in ("uniform_soup", "greedy_soup"):
        report, wall = run("zoo-soup.yaml", work / name, [f"optimizer.name={name}"])
        soup_recipes[f"{name.replace('_', ' ')} (soup group: {len(members)} {skill} fine-tunes)"] = dict(
            pick(report, "optimizer").recipe or {}
        )
        cost[next(reversed(soup_recipes))] = (report.count, wall)
    soups = compare(zoo / "zoo.json", soup_recipes, skills=[skill], hand_set=False)
    out["soups"] = {"skill": skill, **soups.to_dict()}
    return out


def print_table(seed: int, result: dict) -> None:
    test, cost = result["test"], result["cost"]
    print(f"\n#### zoo seed {seed} (test split; kept = gain retention)\n")
    print(
        "| technique | latin | greek | cyrillic | kept latin | kept greek | kept cyrillic | kept, weakest | scored | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, scores in test["scores"].items():
        kept = test["gain_retention"].get(row)
        cells = [f"{scores[s]:.3f}" for s in SKILLS]
        cells += [f"{kept[s]:.0%}" if kept else "" for s in SKILLS]
        cells.append(f"**{min(kept.values()):.0%}**" if kept and not row.startswith("specialist") else "")
        n, wall = cost.get(row, ("", None))
        cells += [str(n), f"{wall:.0f}" if wall is not None else ""]
        print(f"| {row} | " + " | ".join(cells) + " |")
    soups = result["soups"]
    skill = soups["skill"]
    for row, scores in soups["scores"].items():
        if row == "base" or row.startswith("specialist"):
            continue
        kept = soups["gain_retention"][row][skill]
        cells = ["", "", ""]
        cells[SKILLS.index(skill)] = f"{scores[skill]:.3f}"
        kept_cells = ["", "", ""]
        kept_cells[SKILLS.index(skill)] = f"{kept:.0%}"
        n, wall = cost[row]
        print(f"| {row} | " + " | ".join(cells + kept_cells + ["", str(n), f"{wall:.0f}"]) + " |")


def over_zoo_seeds(seeds: list[int], prefix: str, one: Any, show: Any, json_path: Path | None) -> dict:
    """``one(zoo, manifest, work)`` per zoo seed (built or reused; a temporary work dir), then ``show(seed,
    result)``; the results so far written to ``json_path`` after each seed."""
    results: dict = {}
    for seed in seeds:
        print(f"zoo seed {seed}", file=sys.stderr, flush=True)
        zoo = build_zoo(default_zoo_dir(seed), seed, progress=False).parent
        os.environ["EVOMERGE_ZOO_DIR"] = str(zoo)
        manifest = json.loads((zoo / "zoo.json").read_text())
        work = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            results[seed] = one(zoo, manifest, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        show(seed, results[seed])
        if json_path:
            json_path.write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    one = lambda zoo, manifest, work: one_seed(zoo, manifest, work, args.budget)  # noqa: E731
    over_zoo_seeds(args.zoo_seeds, "bench-methods-", one, print_table, args.json)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Soups and sweeps on the toy zoo, held-out test split, next to what they compete with.

- **Soups**: the zoo's soup group (zoo.json ``soups``: fine-tunes of one skill differing only in data
  order). ``uniform_soup`` and ``greedy_soup`` (configs/zoo-soup.yaml) rank on the search split; the
  table shows each ingredient, the uniform soup and the greedy soup's choice on the test split.
- **Sweep**: configs/zoo-sweep.yaml (5 x 5 grid over the task-arithmetic weights of the latin and
  cyrillic specialists, quadratic fit, weaker skill on the search split). The table shows the fit's pick,
  the sweep's choice, the base, the two specialists and the hand-set merges of the pair on the test
  split, with gain retention (merge - base) / (specialist - base).

In-process workers (deterministic). Every number is measured in this run.

    .venv/bin/python scripts/bench_soups.py [--zoo-seeds 0 1] [--json out.json]
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


def run(config: str, run_dir: Path, overrides: list[str]) -> tuple[RunReport, float]:
    resolved = load_run_config(ROOT / "configs" / config, ["runtime.workers=0", *overrides])
    executor = make_executor(resolved)
    try:
        started = time.perf_counter()
        summary = Search(resolved, RunDir(run_dir), executor).execute()
        wall = time.perf_counter() - started
    finally:
        executor.shutdown()
    if summary.stopped != "done":
        sys.exit(f"{config}: stopped with {summary.stopped!r}, not done")
    return RunReport.load(run_dir), wall


def single(model: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}], "dtype": "float32"}


def soups(zoo: Path, manifest: dict, work: Path) -> dict:
    skill, members = next(iter(manifest["soups"].items()))
    out: dict = {"skill": skill, "search": {}, "wall_s": {}}
    recipes = {f"ingredient {Path(m).name}": single(str(zoo / m)) for m in members}
    for name in ("uniform_soup", "greedy_soup"):
        report, wall = run("zoo-soup.yaml", work / name, [f"optimizer.name={name}"])
        chosen = pick(report, "optimizer")
        recipes[name.replace("_", " ")] = dict(chosen.recipe or {})
        out["search"][name] = {"candidates": report.count, "choice": chosen.id, **report.optimizer_summary}
        out["wall_s"][name] = wall
    comparison = compare(zoo / "zoo.json", recipes, skills=[skill], hand_set=False)
    out["test"] = {row: scores[skill] for row, scores in comparison.scores.items()}
    return out


def sweep(zoo: Path, work: Path) -> dict:
    report, wall = run("zoo-sweep.yaml", work / "sweep", [])
    summary = report.optimizer_summary or {}
    by_id = {r.id: r for r in report.records}
    fitted = [r for r in report.records if r.genome and list(r.genome) == summary.get("pick")]
    recipes = {"sweep choice": dict(by_id[summary["choice_id"]].recipe or {})}
    if fitted:
        recipes["sweep fit's pick"] = dict(fitted[-1].recipe or {})
    skills = [label.split("/")[0].removeprefix("zoo_") for label in report.labels]
    comparison = compare(zoo / "zoo.json", recipes, skills=skills)
    return {"wall_s": wall, "candidates": report.count, "summary": summary, "test": comparison.to_dict()}


def print_tables(results: dict) -> None:
    for seed, result in results.items():
        soup = result["soups"]
        print(f"\n### zoo seed {seed}: soups of `{soup['skill']}` (test accuracy)\n")
        print("| model | test acc |")
        print("|---|---|")
        for row, value in soup["test"].items():
            print(f"| {row} | {value:.3f} |")
        greedy = soup["search"]["greedy_soup"]
        print(
            f"\ngreedy soup: order {greedy['order']}, kept {[s['kept'] for s in greedy['steps']]}, "
            f"{greedy['candidates']} candidates in {soup['wall_s']['greedy_soup']:.0f} s; "
            f"uniform soup: {soup['search']['uniform_soup']['candidates']} in {soup['wall_s']['uniform_soup']:.0f} s"
        )
        sw = result["sweep"]
        test = sw["test"]
        skills = list(test["tasks"])
        print(f"\n### zoo seed {seed}: sweep over two task-arithmetic weights (test accuracy, gain retention)\n")
        print("| merge | " + " | ".join(skills) + " | kept " + " | kept ".join(skills) + " |")
        print("|---|" + "---|" * (2 * len(skills)))
        for row, scores in test["scores"].items():
            kept = test["gain_retention"].get(row)
            cells = [f"{scores[s]:.3f}" for s in skills]
            cells += [f"{kept[s]:.0%}" if kept else "" for s in skills]
            print(f"| {row} | " + " | ".join(cells) + " |")
        summary = sw["summary"]
        print(
            f"\n{sw['candidates']} candidates in {sw['wall_s']:.0f} s; fit's pick {summary['pick']} "
            f"(fitted {-summary['pick_fitted']:.3f}, measured {-summary['pick_measured']:.3f} on the search split), "
            f"choice {summary['choice']} (genes in 0-1 of their bounds [0, 2])"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {}
    for seed in args.zoo_seeds:
        zoo = build_zoo(default_zoo_dir(seed), seed, progress=False).parent
        os.environ["EVOMERGE_ZOO_DIR"] = str(zoo)
        manifest = json.loads((zoo / "zoo.json").read_text())
        work = Path(tempfile.mkdtemp(prefix="bench-soups-"))
        try:
            results[seed] = {"soups": soups(zoo, manifest, work), "sweep": sweep(zoo, work)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

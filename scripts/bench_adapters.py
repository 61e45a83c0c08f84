#!/usr/bin/env python
"""LoRA specialists on the toy zoo: merged in full-weight space vs in adapter space, and searched.

The zoo's LoRA specialists (zoo.json ``adapters``: rank-8 PEFT adapters of the base, one per skill,
trained on the same data and steps as the full fine-tunes) are merged

- in full-weight space, as BASE+ADAPTER sources of ordinary recipes (task arithmetic λ 0.5 / 1, TIES);
- in adapter space, into one adapter (PEFT's ``add_weighted_adapter`` combinations, weight 1 each:
  ``cat``, which keeps every delta and so equals task arithmetic λ 1; ``linear``, which mixes the A and
  B factors and so is only an approximation; ``svd`` at rank 8 and 24; ``ties`` and ``magnitude_prune``
  on the factors, density 0.5; ``ties_svd``);
- and searched: CMA-ES over per-layer task-arithmetic weights of the LoRA sources (configs/zoo-ps-cma.yaml
  with its models replaced, 200 candidates) and the gradient baseline (configs/zoo-ps-gradient.yaml,
  the same replacement).

Test split, gain retention (merge - base) / (LoRA specialist - base) per skill (the LoRA specialists
are the reference here), in-process, every number measured in this run:

    .venv/bin/python scripts/bench_adapters.py [--zoo-seeds 0 1] [--json out.json] [--budget 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.merge.adapters import merge_adapters_to_disk  # noqa: E402
from evomerge.recipe.adapters import AdapterMerge  # noqa: E402
from evomerge.search.picks import pick  # noqa: E402
from evomerge.zoo.compare import compare  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_methods import over_zoo_seeds, run, weakest_skill_pick  # noqa: E402

SKILLS = ("latin", "greek", "cyrillic")
ADAPTER_MERGES = [
    ("cat", {}),
    ("linear", {}),
    ("svd", {"svd_rank": 8}),
    ("svd", {"svd_rank": 24}),
    ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.5}),
    ("ties_svd", {"density": 0.5, "svd_rank": 24}),
]


def one_seed(zoo: Path, manifest: dict, work: Path, budget: int) -> dict:
    base = str(zoo / manifest["base"])
    lora = {s: f"{base}+{zoo / manifest['adapters'][s]}" for s in SKILLS}

    def single(model: str) -> dict:
        return {
            "merge_method": "linear",
            "models": [{"model": model, "parameters": {"weight": 1.0}}],
            "dtype": "float32",
        }

    def task_arithmetic(method: str, weight: float, **extra: float) -> dict:
        params = {"weight": weight, **extra}
        models = [{"model": m, "parameters": dict(params)} for m in lora.values()]
        return {"merge_method": method, "base_model": base, "models": models, "dtype": "float32"}

    recipes = {f"LoRA specialist {s}": single(m) for s, m in lora.items()}
    recipes["full-weight: task arithmetic λ=0.5"] = task_arithmetic("task_arithmetic", 0.5)
    recipes["full-weight: task arithmetic λ=1"] = task_arithmetic("task_arithmetic", 1.0)
    recipes["full-weight: TIES (w=1, density=0.5)"] = task_arithmetic("ties", 1.0, density=0.5)
    cost: dict[str, tuple[int, float]] = {}
    for combination, params in ADAPTER_MERGES:
        label = f"adapter space: {combination}" + "".join(f", {k} {v}" for k, v in params.items())
        spec = AdapterMerge.from_dict(
            {
                "adapter_merge": combination,
                "base_model": base,
                "adapters": [{"adapter": str(zoo / manifest["adapters"][s]), "weight": 1.0} for s in SKILLS],
                **params,
            }
        )
        out = work / f"adapter-{len(cost)}"
        started = time.perf_counter()
        merge_adapters_to_disk(spec, out)
        cost[label] = (1, time.perf_counter() - started)
        recipes[label] = single(f"{base}+{out}")
    for label, config, space_file in [
        ("gradient over the LoRA sources, 96 genes", "zoo-ps-gradient.yaml", "zoo-ps-ta-modules.yaml"),
        (f"CMA-ES over the LoRA sources, 24 genes, {budget} cand.", "zoo-ps-cma.yaml", "zoo-ps-ta.yaml"),
    ]:
        print(f"  {label} ...", file=sys.stderr, flush=True)
        space = yaml.safe_load((ROOT / "search_spaces" / space_file).read_text())
        space["models"] = [f"lora-{s}" for s in SKILLS]  # the zoo's names for BASE+ADAPTER
        space_path = work / f"space-{len(cost)}.yaml"
        space_path.write_text(yaml.safe_dump(space))
        overrides = (
            [f"search_space={space_path}", f"optimizer.budget={budget}"]
            if "CMA" in label
            else [f"search_space={space_path}"]
        )
        report, wall = run(config, work / f"run-{len(cost)}", overrides)
        recipes[label] = weakest_skill_pick(report) if "CMA" in label else dict(pick(report, "optimizer").recipe or {})
        cost[label] = (report.count, wall)
    comparison = compare(zoo / "zoo.json", recipes, hand_set=False)
    return {"test": comparison.to_dict(), "cost": cost}


def print_table(seed: int, result: dict) -> None:
    test, cost = result["test"], result["cost"]
    scores = test["scores"]
    base = scores["base"]
    reference = {s: scores[f"LoRA specialist {s}"][s] for s in SKILLS}
    print(f"\n#### zoo seed {seed} (test split; kept = gain retention over the LoRA specialists)\n")
    print(
        "| merge of the LoRA specialists | latin | greek | cyrillic | kept latin | kept greek | kept cyrillic | kept, weakest | scored | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, values in scores.items():
        if row.startswith("specialist"):  # the full fine-tunes: their own-skill line below
            continue
        kept = {s: (values[s] - base[s]) / (reference[s] - base[s]) for s in SKILLS} if row != "base" else None
        cells = [f"{values[s]:.3f}" for s in SKILLS]
        cells += [f"{kept[s]:.0%}" if kept else "" for s in SKILLS]
        cells.append(f"**{min(kept.values()):.0%}**" if kept and not row.startswith("LoRA specialist") else "")
        n, wall = cost.get(row, ("", None))
        cells += [str(n), f"{wall:.1f}" if wall is not None else ""]
        print(f"| {row} | " + " | ".join(cells) + " |")
    full = {s: scores[f"specialist {s}"][s] for s in SKILLS}
    print("\nfull fine-tunes' own skill: " + ", ".join(f"{s} {v:.3f}" for s, v in full.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    one = lambda zoo, manifest, work: one_seed(zoo, manifest, work, args.budget)  # noqa: E731
    over_zoo_seeds(args.zoo_seeds, "bench-adapters-", one, print_table, args.json)


if __name__ == "__main__":
    main()

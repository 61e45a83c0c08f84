#!/usr/bin/env python
"""A mixture of the zoo's three specialists (``evomerge moe``) next to the dense merges.

Experts: the latin, greek and cyrillic specialists' MLPs; attention, embeddings and norms: the base's
(mergekit-moe's usual setting), or the dense task-arithmetic (λ 0.5) merge's ("MoE from merged models");
routers set from 8 search-split prompts per skill (``gate_mode`` hidden or cheap_embed, as mergekit-moe
sets them), 1, 2 or 3 experts per token. Scored on the test split of each skill and the synergy task,
with gain retention per skill, next to the specialists and the hand-set dense merges, and with each
model's parameters and the parameters one token passes through (the multiply-accumulates per token are
about that many: 2 FLOPs each, attention scores aside).

With ``--search BUDGET`` it also searches mixtures (``configs/zoo-moe.yaml``: which experts, which of
their router prompts, base, gate mode, experts per token) with CMA-ES (weakest skill) and NSGA-II, in
process, search seed 0, and adds each search's best weakest-skill pick (search split) to the table.

    .venv/bin/python scripts/bench_moe.py [--zoo-seed 0] [--search 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.eval.evaluator import CandidateEvaluator  # noqa: E402
from evomerge.eval.tasks import Objective  # noqa: E402
from evomerge.merge.engine import merge_to_disk  # noqa: E402
from evomerge.merge.moe import build_moe  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.recipe.moe import MoEConfig  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir, load_zoo  # noqa: E402
from evomerge.zoo.compare import compare  # noqa: E402
from evomerge.zoo.quality import gain_retention, hand_set_recipes  # noqa: E402


def parameters(config: dict) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of a Llama or Mixtral config."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * inter
    experts, active = config.get("num_local_experts", 1), config.get("num_experts_per_tok", 1)
    router = hidden * experts if experts > 1 else 0
    embeddings = 2 * config["vocab_size"] * hidden
    norms = (2 * layers + 1) * hidden
    total = layers * (attention + experts * mlp + router) + embeddings + norms
    used = layers * (attention + active * mlp + router) + embeddings + norms
    return total, used


def searched_mixture(zoo_dir: Path, optimizer: dict, budget: int, merged_base: dict | None = None) -> MoEConfig:
    """Search ``configs/zoo-moe.yaml`` (in process) and return its best weakest-skill pick (search split).
    ``merged_base``: a dense recipe offered as one more ``base_model`` choice (a stage of the space)."""
    import yaml

    from evomerge.runtime.factory import make_executor
    from evomerge.search.config import resolve_run_config
    from evomerge.search.driver import Search
    from evomerge.search.rundir import RunDir

    raw = yaml.safe_load((ROOT / "configs" / "zoo-moe.yaml").read_text())
    space = yaml.safe_load((ROOT / "search_spaces" / "zoo-moe.yaml").read_text())
    raw.update(search_space=space, zoo=str(zoo_dir), runtime={"workers": 0})
    raw["optimizer"] = {**raw["optimizer"], **optimizer, "budget": budget}
    with tempfile.TemporaryDirectory(prefix="bench-moe-search-") as work:
        if merged_base is not None:
            (Path(work) / "merged.yaml").write_text(yaml.safe_dump(merged_base))
            space["base_model"] = [*space["base_model"], "merged"]
            space["stages"] = {"merged": {"recipe": "merged.yaml"}}
        run = resolve_run_config(raw, base_dir=Path(work))
        executor = make_executor(run)
        try:
            Search(run, RunDir(Path(work) / "run"), executor).execute()
        finally:
            executor.shutdown()
        records = [r for r in RunDir(Path(work) / "run").records() if r.ok and r.full]
    best = max(records, key=lambda r: (min(r.objectives.values()), sum(r.objectives.values()), -r.id))
    return MoEConfig.model_validate(best.recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--search", type=int, default=0, help="also search mixtures with this budget")
    args = parser.parse_args()
    zoo_json = build_zoo(default_zoo_dir(args.zoo_seed), args.zoo_seed, progress=False)
    meta = load_zoo(zoo_json)
    skills = list(meta["models"])
    dense = compare(zoo_json, {}, synergy=True)
    base_config = json.loads((meta["base"] / "config.json").read_text())
    tasks = {s: meta["tasks"][s] for s in skills}
    tasks[meta["synergy"]["name"]] = meta["synergy"]["task"]
    evaluator = CandidateEvaluator(
        [Objective(task=t, metric="acc", split="test") for t in tasks.values()], include_paths=[meta["include_path"]]
    )
    prompts = {
        s: [
            json.loads(line)["query"]
            for line in (meta["include_path"] / "data" / f"{s}.search.jsonl").read_text().splitlines()[:8]
        ]
        for s in skills
    }
    rows: dict[str, tuple[dict[str, float], tuple[int, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as work:
        # "MoE from merged models": attention, embeddings and norms from the dense TA λ=0.5 merge
        merged = merge_to_disk(
            Recipe.from_dict(
                hand_set_recipes(str(meta["base"]), [str(meta["models"][s]) for s in skills])["task arithmetic (λ=0.5)"]
            ),
            Path(work) / "ta05",
        )
        for (base_label, base_model), gate_mode, per_token in itertools.product(
            (("base", meta["base"]), ("TA λ=0.5 merge", merged)), ("hidden", "cheap_embed"), (1, 2, 3)
        ):
            if base_label != "base" and per_token == 2:
                continue
            config = MoEConfig.model_validate(
                {
                    "base_model": str(base_model),
                    "gate_mode": gate_mode,
                    "experts_per_token": per_token,
                    "experts": [
                        {"source_model": str(meta["models"][s]), "positive_prompts": prompts[s]} for s in skills
                    ],
                }
            )
            out = build_moe(config, Path(work) / f"{base_label}-{gate_mode}-{per_token}")
            result = evaluator.evaluate_checkpoint(out)
            assert result.ok, result.reason
            scores = {name: result.objectives[f"{task}/acc"] for name, task in tasks.items()}
            label = f"MoE on the {base_label}, {gate_mode} gates, {per_token} of 3 experts per token"
            rows[label] = (scores, parameters(json.loads((out / "config.json").read_text())))
    if args.search:
        cma = {"name": "cma", "scalarize": "worst", "sigma": 0.3}
        ta05 = hand_set_recipes(str(meta["base"]), [str(meta["models"][s]) for s in skills])["task arithmetic (λ=0.5)"]
        for label, optimizer, merged_base in (
            ("CMA-ES (weakest skill)", cma, None),
            ("NSGA-II", {"name": "nsga2"}, None),
            ("CMA-ES (weakest skill), the TA λ=0.5 merge a base choice", cma, ta05),
        ):
            config = searched_mixture(meta["root"], optimizer, args.search, merged_base)
            result = evaluator.evaluate(config)
            assert result.ok, result.reason
            scores = {name: result.objectives[f"{task}/acc"] for name, task in tasks.items()}
            hf = {
                **base_config,
                "num_local_experts": len(config.experts),
                "num_experts_per_tok": config.experts_per_token,
            }
            experts = "+".join(Path(e.source_model).name for e in config.experts)
            where = Path(config.base_model).name
            where = "TA λ=0.5 merge" if where.startswith("merged-") else where
            row = (
                f"searched MoE, {label}, {args.search} cand.: experts {experts} on the {where}'s attention, "
                f"{config.gate_mode} gates, {config.experts_per_token} per token"
            )
            rows[row] = (scores, parameters(hf))
    base_scores = dense.scores["base"]
    synergy = meta["synergy"]["name"]
    print(f"\n#### zoo seed {args.zoo_seed}: test split; kept = gain retention over each specialist\n")
    print(
        "| model | "
        + " | ".join(skills)
        + f" | {synergy} | "
        + " | ".join(f"kept {s}" for s in skills)
        + " | kept, weakest | parameters | used per token |"
    )
    print("|---|" + "---:|" * (2 * len(skills) + 4))
    dense_params = parameters(base_config)
    table = [(row, dense.scores[row], dense_params) for row in dense.scores]
    table += [(label, scores, params) for label, (scores, params) in rows.items()]
    for row, scores, (total, used) in table:
        kept = {s: gain_retention(scores[s], base_scores[s], dense.scores[f"specialist {s}"][s]) for s in skills}
        show_kept = row != "base" and not row.startswith("specialist")
        cells = [f"{scores[s]:.3f}" for s in skills] + [f"{scores.get(synergy, float('nan')):.3f}"]
        cells += [f"{kept[s]:.0%}" if show_kept else "" for s in skills]
        cells.append(f"**{min(kept.values()):.0%}**" if show_kept else "")
        cells += [f"{total / 1e6:.2f} M", f"{used / 1e6:.2f} M"]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Permutation alignment: the loss barrier between two independently trained bases, before and after.

Two zoo bases built from different seeds (different initializations, and different known letters; the
same tokenizer, codes and copying data) are interpolated linearly, (1 - t) A + t B, with B as trained and
with B permuted into A's basis (``evomerge align``, Git Re-Basin weight matching). Each point is scored
on what both bases learned alike, copying in each alphabet (``cpy@<alphabet>``, 200 items each, written
here as lm-eval tasks): the items' mean negative log-likelihood (log of lm-eval's per-item
``perplexity``, averaged over the alphabets) and exact match; and on the reference zoo's three skill
tasks (exact match; each base knows other letters' codes). The barrier at t is the loss there minus the
straight line between the endpoints' losses.

    .venv/bin/python scripts/bench_align.py [--zoo-seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.eval.evaluator import CandidateEvaluator  # noqa: E402
from evomerge.eval.tasks import Objective  # noqa: E402
from evomerge.merge.align import align_checkpoints  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir, load_zoo  # noqa: E402

POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
ALPHABETS = ("latin", "greek", "cyrillic")


def copy_tasks(folder: Path) -> list[str]:
    """lm-eval tasks of copying in each alphabet (the zoo's task format), under ``folder``."""
    import yaml

    from evomerge.zoo.skills import eval_inputs, get_skill

    names = []
    for alphabet in ALPHABETS:
        skill = get_skill(f"cpy@{alphabet}")
        _, test = eval_inputs(skill, 12345, 1, 200)
        data = folder / f"copy_{alphabet}.jsonl"
        data.write_text("".join(json.dumps(skill.item(x)) + "\n" for x in test))
        name = f"copy_{alphabet}"
        cfg = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "query",
            "doc_to_target": "target",
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seeds", type=int, nargs=2, default=[0, 1])
    args = parser.parse_args()
    zoo_a, zoo_b = (load_zoo(build_zoo(default_zoo_dir(s), s, progress=False)) for s in args.zoo_seeds)
    a, b = str(zoo_a["base"]), str(zoo_b["base"])
    skills = list(zoo_a["tasks"])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-align-") as work:
        copies = copy_tasks(Path(work))
        objectives = [Objective(task=t, metric=m, split="test") for t in copies for m in ("perplexity", "acc")]
        objectives += [Objective(task=zoo_a["tasks"][s], metric="acc", split="test") for s in skills]
        evaluator = CandidateEvaluator(objectives, include_paths=[zoo_a["include_path"], work])
        aligned = Path(work) / "aligned"
        started = time.perf_counter()
        found = align_checkpoints(a, b, aligned)
        align_s = time.perf_counter() - started
        by_activations = Path(work) / "aligned-activations"
        texts = [json.loads(line) for c in copies for line in (Path(work) / f"{c}.jsonl").read_text().splitlines()]
        texts += [
            json.loads(line)
            for s in skills
            for line in (zoo_a["include_path"] / "data" / f"{s}.search.jsonl").read_text().splitlines()
        ]
        align_checkpoints(a, b, by_activations, data=[t["query"] + t["target"] for t in texts])
        for label, other in (
            ("unaligned", b),
            ("aligned (weights)", str(aligned)),
            ("aligned (activations)", str(by_activations)),
        ):
            for t in POINTS:
                models = [{"model": a, "parameters": {"weight": 1 - t}}, {"model": other, "parameters": {"weight": t}}]
                result = evaluator.evaluate(
                    Recipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": models})
                )
                assert result.ok, result.reason
                loss = sum(math.log(result.objectives[f"{c}/perplexity"]) for c in copies) / len(copies)
                copied = [result.objectives[f"{c}/acc"] for c in copies]
                acc = [result.objectives[f"{zoo_a['tasks'][s]}/acc"] for s in skills]
                rows[label, t] = (loss, copied, acc)
    moved = found["moved"]
    print(
        f"\n#### zoo base seed {args.zoo_seeds[0]} (A) and seed {args.zoo_seeds[1]} (B): (1 - t) A + t B, "
        f"test items\n\nAlignment: {align_s:.1f} s; units moved: residual channels {moved['residual']}, MLP neurons "
        f"{sum(v for k, v in moved.items() if k.startswith('mlp.'))}, head groups "
        f"{sum(v for k, v in moved.items() if k.startswith('heads.'))}; <A, B> {found['inner_product']['before']:.0f} "
        f"-> {found['inner_product']['after']:.0f}.\n"
    )
    print(
        "| B | t | copying loss (mean NLL per item) | barrier | copying exact match "
        + " / ".join(ALPHABETS)
        + f" | zoo seed {args.zoo_seeds[0]} skills exact match "
        + " / ".join(skills)
        + " |"
    )
    print("|---|---:|---:|---:|---|---|")
    for label in ("unaligned", "aligned (weights)", "aligned (activations)"):
        ends = rows[label, 0.0][0], rows[label, 1.0][0]
        for t in POINTS:
            loss, copied, acc = rows[label, t]
            barrier = loss - ((1 - t) * ends[0] + t * ends[1])
            cells = [" / ".join(f"{v:.3f}" for v in copied), " / ".join(f"{v:.3f}" for v in acc)]
            print(f"| {label} | {t:.2f} | {loss:.3f} | {barrier:+.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

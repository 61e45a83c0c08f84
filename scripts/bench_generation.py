#!/usr/bin/env python
"""Generative scoring speed: evomerge's fast backend against lm-eval's own evaluator, same model, same items.

The zoo's generative tasks (``zoo_<skill>_gen``: greedy generation, a regex filter, exact match) on the
test split, scored by both backends over one resident model, each model in turn (the base and the
specialists), the two backends alternating and each timed ``--repeats`` times (median reported): items
per second and the ratio. Both must give the same per-item values (checked every time). Tasks are built
once per backend beforehand, as a search's workers do; the times are scoring only.

    .venv/bin/python scripts/bench_generation.py [--zoo-seed 0] [--split test] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evomerge.eval.scorer import FastScorer, LmEvalScorer, make_hflm  # noqa: E402
from evomerge.eval.tasks import Objective, prepare_tasks  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir, load_zoo  # noqa: E402

METRIC = "exact_match,answer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--split", default="test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = load_zoo(build_zoo(default_zoo_dir(args.zoo_seed), args.zoo_seed, progress=False))
    objectives = [Objective(task=t, metric=METRIC, split=args.split) for t in meta["generative_tasks"].values()]
    prepared, _ = prepare_tasks(objectives, [meta["include_path"]])
    items = sum(len(p.doc_ids) for p in prepared)
    tokenizer = AutoTokenizer.from_pretrained(meta["base"])
    rows = []
    for name, path in [("base", meta["base"]), *((f"specialist {s}", p) for s, p in meta["models"].items())]:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        fast = FastScorer(prepared, make_hflm(model, tokenizer))
        reference = LmEvalScorer(prepared, tokenizer)
        times: dict[str, list[float]] = {"fast": [], "lm-eval": []}
        for _ in range(args.repeats):
            for label, scorer in (("fast", fast), ("lm-eval", reference)):
                started = time.perf_counter()
                scores = scorer.score(model)
                times[label].append(time.perf_counter() - started)
                if label == "fast":
                    values, accuracy = dict(scorer.item_values), [s[METRIC] for s in scores.values()]
            if scorer.item_values != values:
                sys.exit(f"{name}: the backends disagree on some item")
        fast_s, ref_s = statistics.median(times["fast"]), statistics.median(times["lm-eval"])
        rows.append((name, accuracy, items / fast_s, items / ref_s, ref_s / fast_s))
        print(f"  {name}: fast {fast_s:.2f} s, lm-eval {ref_s:.2f} s", file=sys.stderr, flush=True)

    skills = list(meta["generative_tasks"])
    print(
        f"\n#### zoo seed {args.zoo_seed}, {args.split} split: {items} generative items ({', '.join(skills)}), "
        f"{args.threads} threads, median of {args.repeats}\n"
    )
    print("| model | exact match " + " / ".join(skills) + " | fast items/s | lm-eval items/s | fast / lm-eval |")
    print("|---|---|---:|---:|---:|")
    for name, accuracy, fast_rate, ref_rate, ratio in rows:
        print(
            f"| {name} | {' / '.join(f'{a:.3f}' for a in accuracy)} | {fast_rate:.0f} | {ref_rate:.0f} | {ratio:.1f}x |"
        )


if __name__ == "__main__":
    main()

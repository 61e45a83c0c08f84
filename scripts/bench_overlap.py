#!/usr/bin/env python
"""Overlap (``runtime.overlap``): candidates per minute of one worker that merges candidate k+1 while it
scores candidate k, next to the same worker taking one candidate at a time, side by side in one run.

What a Ray worker with two lanes does, in process (no Ray noise): two threads pull candidates from one
queue and call one ``CandidateEvaluator(buffers=2)``; the baseline is one thread and ``buffers=1``.
The rounds alternate (one at a time, overlapped, one at a time, ...) so that machine load falls on
both alike. The family is a synthetic Llama (random weights, the zoo's tokenizer and tasks: the
scores are meaningless, the timings are not); candidates are task-arithmetic recipes with fresh
random weights, and both ways must give the same scores.

    .venv/bin/python scripts/bench_overlap.py [--hidden 1024 --layers 8] [--candidates 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eval import make_large, recipes  # noqa: E402

from evomerge.eval.evaluator import CandidateEvaluator  # noqa: E402
from evomerge.eval.result import CandidateResult  # noqa: E402
from evomerge.eval.tasks import Objective  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir  # noqa: E402


def run(evaluator: CandidateEvaluator, todo: list[Recipe], threads: int) -> tuple[float, list[CandidateResult]]:
    """Seconds to score ``todo`` with ``threads`` threads sharing ``evaluator``; the results in order."""
    jobs: queue.Queue[tuple[int, Recipe]] = queue.Queue()
    for item in enumerate(todo):
        jobs.put(item)
    values: list[Any] = [None for _ in todo]
    errors: list[str] = []

    def work() -> None:
        while True:
            try:
                i, recipe = jobs.get_nowait()
            except queue.Empty:
                return
            result = evaluator.evaluate(recipe)
            if not result.ok:
                errors.append(str(result.reason))
            values[i] = result

    start = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - start, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=8, help="per round and way")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=50, help="items per task (search split)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    zoo = default_zoo_dir(0)
    build_zoo(zoo, seed=0)
    include = str(zoo / "tasks")
    objectives = [Objective(task=f"zoo_{s}", metric="acc", limit=args.limit) for s in ("latin", "greek", "cyrillic")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        base, models, params = make_large(zoo, Path(tmp), args.hidden, args.layers)
        print(
            f"synthetic Llama: hidden {args.hidden}, {args.layers} layers, {params / 1e6:.0f}M parameters", flush=True
        )
        ways = {
            "one at a time": (CandidateEvaluator(objectives, include_paths=[include], device="cpu", buffers=1), 1),
            "overlapped": (CandidateEvaluator(objectives, include_paths=[include], device="cpu", buffers=2), 2),
        }
        warm = recipes(base, models, 2, seed=999)
        for evaluator, threads in ways.values():  # resident models, tokenizer, requests: built once
            run(evaluator, warm, threads)
        seconds = {name: 0.0 for name in ways}
        merge_s: list[float] = []
        score_s: list[float] = []
        for r in range(args.rounds):
            todo = recipes(base, models, args.candidates, seed=r)
            got = {}
            for name, (evaluator, threads) in ways.items():
                s, got[name] = run(evaluator, todo, threads)
                seconds[name] += s
                print(f"round {r + 1}: {name}: {args.candidates} candidates in {s:.1f} s", flush=True)
            if [r.objectives for r in got["one at a time"]] != [r.objectives for r in got["overlapped"]]:
                raise SystemExit("the two ways gave different scores")
            merge_s += [r.materialize_seconds for r in got["one at a time"]]
            score_s += [r.score_seconds for r in got["one at a time"]]
        n = args.candidates * args.rounds
        for name in ways:
            rows.append({"way": name, "candidates": n, "seconds": seconds[name], "per_minute": 60 * n / seconds[name]})
    ratio = seconds["one at a time"] / seconds["overlapped"]
    print(
        f"\n# bench_overlap · {os.cpu_count()} cores · {platform.processor() or platform.machine()} · torch "
        f"{torch.__version__} · {torch.get_num_threads()} threads\n"
    )
    print(
        f"Synthetic Llama, {params / 1e6:.0f}M parameters; {n} candidates per way; one at a time, a candidate "
        f"takes {sum(merge_s) / len(merge_s):.2f} s to merge and {sum(score_s) / len(score_s):.2f} s to score.\n"
    )
    print("| way | candidates per minute | seconds |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['way']} | {row['per_minute']:.1f} | {row['seconds']:.1f} |")
    print(f"\noverlapped / one at a time: {ratio:.2f}x candidates per minute (same scores)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio, "params": params}, indent=2))


if __name__ == "__main__":
    main()

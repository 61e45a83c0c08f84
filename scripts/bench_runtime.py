#!/usr/bin/env python
"""Dispatch overhead of the Ray pool, without models: how busy fake workers are kept.

Each job sleeps ``--job-s`` seconds in a worker (``tests/fake_evaluators.py``); a driver loop shaped
like the search driver's keeps ``capacity`` jobs in flight and sleeps ``--driver-ms`` after each
outcome (standing in for writing the record and logging it). Reported per setting: jobs per minute,
the executor's own ``idle_fraction()``, an independent idle fraction from the workers' own clocks
(1 - time inside ``evaluate`` / (workers x wall)), the overhead per job (workers x wall / jobs - job
time) and the driver process's CPU time per job. Sleeping jobs leave the CPUs free, so the figures
measure the pool more than the machine's load.

    .venv/bin/python scripts/bench_runtime.py [--workers 2] [--jobs 60] [--job-s 0.2] [--driver-ms 0 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_evaluators import recipe_for  # noqa: E402

from evomerge.runtime import EvaluatorSpec, Job, RayExecutor, start_local_ray  # noqa: E402

FAKES_ENV = {"env_vars": {"PYTHONPATH": str(ROOT / "tests")}}


def one_run(executor: RayExecutor, jobs: int, job_s: float, driver_s: float, first_id: int) -> dict:
    """Drive ``jobs`` sleeping jobs through ``executor`` as the search driver would; the figures."""
    inside = 0.0
    submitted = done = in_flight = 0
    t0, cpu0 = time.time(), time.process_time()
    while done < jobs:
        while submitted < jobs and in_flight < executor.capacity:
            executor.submit(Job(first_id + submitted, recipe_for(f"sleep:{job_s}")))
            submitted += 1
            in_flight += 1
        outcome = executor.next_outcome(timeout=1.0)
        if outcome is None:
            continue
        assert outcome.result.ok, outcome.result.reason
        in_flight -= 1
        done += 1
        inside += outcome.result.objectives["ended"] - outcome.result.objectives["started"]
        if driver_s:
            time.sleep(driver_s)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    workers = executor.capacity
    return {
        "per_minute": 60 * jobs / wall,
        "idle_reported": executor.idle_fraction(),
        "idle_measured": 1 - inside / (workers * wall),
        "overhead_ms": 1000 * (workers * wall / jobs - job_s),
        "driver_cpu_ms": 1000 * cpu / jobs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--job-s", type=float, default=0.2)
    parser.add_argument("--driver-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    start_local_ray(args.workers)
    rows = []
    first_id = 0
    for driver_ms in args.driver_ms:
        runs = []
        for _ in range(args.repeats):
            # a fresh pool per repeat (its actors are ready when it returns): idle_fraction() counts
            # from the first submit
            executor = RayExecutor(
                EvaluatorSpec(objectives=[], factory="fake_evaluators:sleeper"),
                workers=args.workers,
                timeout=60,
                runtime_env=FAKES_ENV,
            )
            try:
                runs.append(one_run(executor, args.jobs, args.job_s, driver_ms / 1000, first_id))
            finally:
                executor.shutdown()
            first_id += args.jobs
        row = {"driver_ms": driver_ms, "runs": runs}
        for key in ("per_minute", "idle_reported", "idle_measured", "overhead_ms", "driver_cpu_ms"):
            row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
        print(
            f"driver {driver_ms:g} ms/outcome: {row['per_minute']:.1f}/min, idle reported {row['idle_reported']:.1%}, "
            f"measured {row['idle_measured']:.1%}, overhead {row['overhead_ms']:.1f} ms/job, "
            f"driver CPU {row['driver_cpu_ms']:.1f} ms/job "
            f"(median of {args.repeats})",
            flush=True,
        )
    print(
        "\n| driver ms/outcome | jobs/min | idle_fraction() | idle, workers' clocks | overhead ms/job "
        "| driver CPU ms/job |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['driver_ms']:g} | {row['per_minute']:.1f} | {row['idle_reported']:.1%} "
            f"| {row['idle_measured']:.1%} | {row['overhead_ms']:.1f} | {row['driver_cpu_ms']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""evomerge.runtime.inprocess: jobs run inside ``submit``, in this process."""

from __future__ import annotations

import os
import time

from fake_evaluators import recipe_for
from runtime_support import fake_spec

from evomerge.runtime import InProcessExecutor, Job


def test_inprocess_executor_runs_in_submit_and_reports_idle_time():
    executor = InProcessExecutor(fake_spec())
    assert executor.capacity == 1 and executor.pending() == 0 and executor.next_outcome() is None
    executor.submit(Job(1, recipe_for("sleep:0.2")))
    assert executor.pending() == 1  # already done, waiting to be taken
    time.sleep(0.2)
    outcome = executor.next_outcome()
    assert outcome.worker == "inprocess" and outcome.result.ok and outcome.job.candidate_id == 1
    assert outcome.result.objectives["pid"] == os.getpid()
    assert executor.pending() == 0 and executor.next_outcome(timeout=0.1) is None
    assert 0.3 < executor.idle_fraction() < 0.7
    executor.shutdown()

"""evomerge.runtime.jobs: the evaluator spec travels (pickles) and builds what it names."""

from __future__ import annotations

import pickle

import pytest
from runtime_support import fake_spec

from evomerge.runtime import EvaluatorSpec


def test_spec_is_picklable_and_builds_a_candidate_evaluator_by_default():
    spec = EvaluatorSpec(objectives=[{"task": "t", "limit": 5}], include_paths=["/x"], seed=3, threads=2)
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ValueError, match="at least one objective"):  # reached CandidateEvaluator
        EvaluatorSpec(objectives=[]).build()
    with pytest.raises(ValueError, match="module:function"):
        EvaluatorSpec(objectives=[], factory="fake_evaluators").build()
    assert type(fake_spec().build()).__name__ == "ScriptedEvaluator"

"""Resident sources (``runtime.resident_sources``): merging from source tensors kept on the scoring
device gives the same model, bit for bit, as merging from the checkpoints; a memory check that says no
falls back to the checkpoints and says why. (On CPU here: the CUDA copy is the same code with another
device; BENCHMARKS.md "CUDA paths" has the GPU runs.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective
from evomerge.merge.plan import build_plan, open_checkpoints
from evomerge.merge.resident import ResidentSources
from evomerge.recipe import Recipe


def recipes(zoo_dir: Path) -> list[Recipe]:
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    models = [str(zoo_dir / meta["models"][s]) for s in ("latin", "greek", "cyrillic")]
    base = str(zoo_dir / meta["base"])
    out = []
    for method, params in [("task_arithmetic", {}), ("dare_ties", {"density": 0.5}), ("ties", {"density": 0.7})]:
        out.append(
            Recipe.from_dict(
                {
                    "merge_method": method,
                    "base_model": base,
                    "models": [
                        {"model": m, "parameters": {"weight": w, **params}} for m, w in zip(models, (0.9, 1.1, 0.7))
                    ],
                }
            )
        )
    return out


def evaluator(zoo_dir: Path, resident: str) -> CandidateEvaluator:
    objectives = [Objective(task=f"zoo_{s}", metric="acc", limit=20) for s in ("latin", "greek")]
    return CandidateEvaluator(objectives, include_paths=[zoo_dir / "tasks"], device="cpu", resident_sources=resident)


def resident_state(ev: CandidateEvaluator) -> dict[str, torch.Tensor]:
    ((model,),) = ev._models.values()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merging_from_resident_sources_gives_the_same_model_and_scores(zoo_dir) -> None:
    on, off = evaluator(zoo_dir, "on"), evaluator(zoo_dir, "off")
    for recipe in recipes(zoo_dir):
        a, b = on.evaluate(recipe), off.evaluate(recipe)
        assert a.ok and b.ok and a.objectives == b.objectives and a.items == b.items
        ours, theirs = resident_state(on), resident_state(off)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert on._resident is not None and on._resident.tensors and on.resident_note is None
    assert off._resident is None


def test_auto_keeps_sources_resident_on_cuda_only(zoo_dir) -> None:
    auto = evaluator(zoo_dir, "auto")
    auto.evaluate(recipes(zoo_dir)[0])
    assert auto._resident is None  # a CPU worker reads its page cache


def test_sources_over_the_budget_fall_back_to_the_checkpoints_and_say_why(zoo_dir, caplog) -> None:
    ev = evaluator(zoo_dir, "on")
    reference = evaluator(zoo_dir, "off")
    recipe = recipes(zoo_dir)[0]
    ev._resident = ResidentSources("cpu", budget_bytes=1024)
    with caplog.at_level("WARNING"):
        result = ev.evaluate(recipe)
    assert result.ok and result.objectives == reference.evaluate(recipe).objectives
    assert ev._resident.tensors == {} and "GiB allowed on cpu" in (ev.resident_note or "")
    assert "merging from the checkpoints instead" in caplog.text


def test_admit_loads_each_source_tensor_once(zoo_dir) -> None:
    first, second = recipes(zoo_dir)[:2]
    resident = ResidentSources("cpu", budget_bytes=2**40)
    plans = [build_plan(r, open_checkpoints(r)) for r in (first, second)]
    assert resident.admit(plans[0])
    held = dict(resident.tensors)
    assert resident.admit(plans[1])  # the same sources: nothing new
    assert resident.tensors.keys() == held.keys() and all(resident.tensors[k] is held[k] for k in held)
    job = plans[0].jobs[0]
    assert torch.equal(resident(job.inputs[0]), plans[0].checkpoints[job.inputs[0][0]].get(job.inputs[0][1]))


def test_an_unknown_setting_is_refused_naming_the_field(zoo_dir) -> None:
    with pytest.raises(ValueError, match=r"runtime.resident_sources: 'gpu' is not valid; use auto, on, off"):
        evaluator(zoo_dir, "gpu")


def test_running_out_of_device_memory_while_loading_undoes_it_and_refuses(zoo_dir, monkeypatch) -> None:
    recipe = recipes(zoo_dir)[0]
    plan = build_plan(recipe, open_checkpoints(recipe))
    resident = ResidentSources("meta", budget_bytes=2**40)  # not a CPU: tensors are copied to it
    original, calls = torch.Tensor.to, []

    def to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise torch.OutOfMemoryError("simulated")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    assert not resident.admit(plan)
    assert resident.tensors == {} and "out of memory" in (resident.refused or "")

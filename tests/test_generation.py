"""Generative tasks in the fast backend: batched greedy decoding with a KV cache gives the texts lm-eval's
``HFLM.generate_until`` gives (stop strings, ``max_gen_toks``), the task's own filter and metric score
them, both backends agree item for item, and a search scores candidates on a generative objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from search_support import search_zoo, zoo_pair_config

from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.scorer import FastScorer, make_hflm
from evomerge.eval.tasks import Objective, prepare_tasks
from evomerge.recipe import Recipe
from evomerge.search.rundir import RunDir

METRIC = "exact_match,answer"


def merge(zoo_dir: Path, weight: float) -> Recipe:
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    models = [{"model": str(zoo_dir / meta["models"][s]), "parameters": {"weight": weight}} for s in ("latin", "greek")]
    return Recipe.from_dict(
        {"merge_method": "task_arithmetic", "base_model": str(zoo_dir / meta["base"]), "models": models}
    )


def variant(zoo_dir: Path, tmp_path: Path, name: str, description: str | None = None, **generation) -> Path:
    """A copy of the zoo's latin generative task with other generation settings (and an instruction
    prepended to every context), in its own directory."""
    cfg = yaml.safe_load((zoo_dir / "tasks" / "zoo_latin_gen.yaml").read_text())
    cfg["task"] = name
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], **generation}
    if description is not None:
        cfg["description"] = description
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_the_zoo_has_a_generative_task_per_skill(zoo_dir) -> None:
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    assert meta["generative_tasks"] == {s: f"zoo_{s}_gen" for s in meta["models"]}
    evaluator = CandidateEvaluator(
        [Objective(task="zoo_latin_gen", metric=METRIC, split="test", limit=40)], include_paths=[zoo_dir / "tasks"]
    )
    specialist = evaluator.evaluate_checkpoint(zoo_dir / meta["models"]["latin"])
    base = evaluator.evaluate_checkpoint(zoo_dir / meta["base"])
    assert specialist.objectives[f"zoo_latin_gen/{METRIC}"] == 1.0  # it writes its answers, not only scores them
    assert base.objectives[f"zoo_latin_gen/{METRIC}"] < 0.6


def test_both_backends_give_the_same_item_values_on_a_generative_task(zoo_dir) -> None:
    objectives = [
        Objective(task="zoo_latin_gen", metric=METRIC, split="test", limit=60),
        Objective(task="zoo_greek_gen", metric=METRIC, split="search", limit=30, subset_seed=2),
        Objective(task="zoo_latin", metric="acc", split="test", limit=60),
    ]
    results = {}
    for backend in ("fast", "lm-eval"):
        evaluator = CandidateEvaluator(objectives, include_paths=[zoo_dir / "tasks"], backend=backend)
        results[backend] = evaluator.evaluate(merge(zoo_dir, 0.8))
    fast, reference = results["fast"], results["lm-eval"]
    assert fast.ok and reference.ok, (fast.reason, reference.reason)
    assert fast.items == reference.items and fast.objectives == reference.objectives
    values = fast.items[f"zoo_latin_gen/{METRIC}"]
    assert 0 < sum(values) < len(values)  # a merge that gets some right and some wrong
    # generating the answer and ranking it by log-likelihood agree on which items are right
    assert fast.items[f"zoo_latin_gen/{METRIC}"] == fast.items["zoo_latin/acc"]


@pytest.mark.parametrize(
    ("name", "generation"),
    [
        ("stop_mid_answer", {"until": ["a", "e"], "max_gen_toks": 10}),  # stop strings inside the answers
        ("short_budget", {"until": ["\n"], "max_gen_toks": 3}),  # cut by max_gen_toks
        ("long_shared_prefix", {"description": "cpy abc=abc. cpy dd=dd. "}),  # a prefix every context shares
    ],
)
@pytest.mark.parametrize("drops_rows", [True, False], ids=["finished-rows-leave-the-cache", "cache-keeps-every-row"])
def test_greedy_texts_equal_hflm_generate_until(zoo_dir, tmp_path, monkeypatch, name, generation, drops_rows) -> None:
    """The raw texts (before the task's filter), request by request, against lm-eval's own path; with a
    KV cache that drops finished rows, and with one that cannot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    def missing(self):
        raise AttributeError("batch_select_indices")

    if not drops_rows:  # a cache class without it (hasattr is False)
        monkeypatch.setattr(DynamicCache, "batch_select_indices", property(missing))

    folder = variant(zoo_dir, tmp_path, name, **generation)
    from evomerge.eval import generation as generation_module

    shared: list[int] = []
    common_prefix = generation_module._common_prefix
    monkeypatch.setattr(generation_module, "_common_prefix", lambda c: shared.append(common_prefix(c)) or shared[-1])
    [item], _ = prepare_tasks([Objective(task=name, metric=METRIC, split="test", limit=50)], [folder])
    meta = json.loads((zoo_dir / "zoo.json").read_text())
    path = zoo_dir / meta["models"]["latin"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    lm = make_hflm(model, AutoTokenizer.from_pretrained(path), batch_size=7)  # other batches than ours
    instances = [inst for group in item.instances_by_doc for inst in group]
    expected = lm.generate_until(instances, disable_tqdm=True)

    from evomerge.eval.generation import greedy_generate

    scorer = FastScorer([item], lm, batch_tokens=300)  # several batches here too
    requests = [r for doc in scorer._generations[0] for r in doc]  # type: ignore[union-attr]
    texts = greedy_generate(model, requests, lm.tok_decode, pad_token_id=scorer._pad, batch_tokens=300)
    assert texts == expected
    if name == "long_shared_prefix":
        assert min(shared) >= 24  # the instruction and "sub " were run once per batch, not per row
    if name == "short_budget":
        assert max(len(t) for t in texts) == 3
    if name == "stop_mid_answer":
        assert any(t and len(t) < 6 for t in texts) and not any(("a" in t or "e" in t) for t in texts)


def test_a_sampling_task_is_refused_by_the_fast_backend_naming_it(zoo_dir, tmp_path) -> None:
    folder = variant(zoo_dir, tmp_path, "sampled", do_sample=True, temperature=0.7)
    with pytest.raises(ValueError, match=r"task sampled: .*greedily only: use --backend lm-eval"):
        CandidateEvaluator(
            [Objective(task="sampled", metric=METRIC, split="test", limit=4)], include_paths=[folder]
        ).evaluate_checkpoint(zoo_dir / "models" / "latin")


def test_a_filtered_metric_must_name_a_filter_the_task_has(zoo_dir) -> None:
    from evomerge.eval.tasks import TaskError

    with pytest.raises(TaskError, match=r"no metric 'exact_match,strict'.*valid: exact_match,answer"):
        prepare_tasks([Objective(task="zoo_latin_gen", metric="exact_match,strict", limit=4)], [zoo_dir / "tasks"])


def test_a_search_on_a_generative_objective_resumes_without_rescoring(zoo_dir, tmp_path) -> None:
    objectives = [
        {"task": "zoo_latin_gen", "metric": METRIC, "limit": 12},
        {"task": "zoo_greek_gen", "metric": METRIC, "limit": 12},
    ]
    config = zoo_pair_config(zoo_dir, objectives, scalarize="worst")

    def search(budget: int, resume: bool) -> None:
        search_zoo(config, tmp_path / "run", budget=budget, resume=resume)

    search(4, resume=False)
    search(8, resume=True)
    run_dir = RunDir(tmp_path / "run")
    records = list(run_dir.records())
    assert len(records) == 8 and all(r.ok for r in records)
    assert {len(v) for items in run_dir.responses().values() for v in items.values()} == {12}
    lines = (tmp_path / "run" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == sum(1 for r in records if not r.cached)
    assert any(0 < r.objectives[f"zoo_latin_gen/{METRIC}"] < 1 for r in records)


@pytest.mark.slow
def test_a_generative_screened_search_on_ray_workers_matches_the_in_process_one(zoo_dir, tmp_path, local_ray) -> None:
    """Both at once, on two Ray workers: generative objectives, screened first, resumed part-way."""
    objectives = [
        {"task": "zoo_latin_gen", "metric": METRIC, "limit": 12, "screen": 4},
        {"task": "zoo_greek_gen", "metric": METRIC, "limit": 12, "screen": 4},
    ]
    config = zoo_pair_config(zoo_dir, objectives, scalarize="worst")
    search_zoo(config, tmp_path / "inprocess", budget=8)
    search_zoo(config, tmp_path / "ray", budget=4, workers=2)
    search_zoo(config, tmp_path / "ray", budget=8, workers=2, resume=True)

    def rows(run: Path) -> list[tuple]:
        records = sorted(RunDir(run).records(), key=lambda r: r.id)  # Ray writes them as they finish
        return [(r.id, r.recipe_hash, r.fidelity, r.promoted_from, dict(r.objectives)) for r in records]

    asked = [row[1] for row in rows(tmp_path / "ray") if row[3] is None]
    assert asked == [row[1] for row in rows(tmp_path / "inprocess") if row[3] is None]
    assert any(row[2] == "full" for row in rows(tmp_path / "ray"))

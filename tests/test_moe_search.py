"""Searching mixtures of experts (``kind: moe`` spaces): the genome always decodes to a valid
mergekit-moe config, a candidate scored in memory scores what its assembled checkpoint scores, and a
search runs end to end (CLI, MLflow, export) to a config that ``evomerge moe`` assembles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_moe import config as moe_config
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.eval.evaluator import CandidateEvaluator
from evomerge.eval.tasks import Objective
from evomerge.merge.moe import build_moe
from evomerge.recipe import MoEConfig, candidate_from_dict
from evomerge.search.genome import MoEGenome, make_genome
from evomerge.search.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "kind": "moe",
    "base_model": ["base", "latin"],
    "experts": [
        {"source_model": "latin", "positive_prompts": ["sub abc=", "sub d=", "sub efg="]},
        {"source_model": "greek", "positive_prompts": ["sub αβγ=", "sub δ="]},
        {"source_model": "cyrillic", "positive_prompts": ["sub абв="]},
    ],
    "gate_mode": ["hidden", "cheap_embed"],
    "experts_per_token": [1, 2],
}


def test_the_genome_names_one_gene_per_expert_prompt_and_choice() -> None:
    genome = make_genome(load_space(SPACE))
    assert isinstance(genome, MoEGenome)
    assert genome.names == [
        "expert[latin]",
        "expert[greek]",
        "expert[cyrillic]",
        *(f"prompt[latin][{i}]" for i in range(3)),
        "prompt[greek][0]",
        "prompt[greek][1]",
        "prompt[cyrillic][0]",
        "base_model",
        "gate_mode",
        "experts_per_token",
    ]
    fixed = make_genome(load_space({**SPACE, "base_model": "base", "gate_mode": "hidden", "experts_per_token": 1}))
    assert fixed.dim == genome.dim - 3  # one choice each: no gene


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=12, max_size=12))
def test_every_point_decodes_to_a_valid_mixture(genes) -> None:
    genome = make_genome(load_space(SPACE))
    config = genome.decode(np.array(genes))
    assert isinstance(config, MoEConfig)
    assert len(config.experts) >= config.experts_per_token  # the strongest experts fill up
    assert all(e.positive_prompts for e in config.experts)  # the strongest prompt when none is chosen
    pools = {e.source_model: e.positive_prompts for e in load_space(SPACE).experts}  # type: ignore[union-attr]
    for expert in config.experts:
        assert set(expert.positive_prompts or []) <= set(pools[expert.source_model])
    assert candidate_from_dict(config.to_dict()).content_hash() == config.content_hash()


def test_choices_follow_their_genes() -> None:
    genome = make_genome(load_space(SPACE))
    x = np.full(genome.dim, 0.9)
    x[:3] = [0.9, 0.1, 0.2]  # only latin chosen, but 2 experts per token: cyrillic (0.2 > 0.1) fills up
    x[genome.names.index("base_model")] = 0.2
    x[genome.names.index("gate_mode")] = 0.7
    x[genome.names.index("experts_per_token")] = 0.99
    config = genome.decode(x)
    assert [e.source_model for e in config.experts] == ["latin", "cyrillic"]
    assert (config.base_model, config.gate_mode, config.experts_per_token) == ("base", "cheap_embed", 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"experts_per_token": [4]}, "experts_per_token: 4 is not in 1..3"),
        ({"experts": SPACE["experts"][:1]}, "experts"),
        ({"gate_mode": ["random"]}, "gate_mode"),
        ({"kind": "mixture"}, "kind: 'mixture' is not valid; use ps, dfs or moe"),
        (
            {"experts": [*SPACE["experts"][:2], {"source_model": "cyrillic", "positive_prompts": ["sub d="]}]},
            r"experts\[2\].positive_prompts: 'sub d=' is also in experts\[0\]'s pool",
        ),
    ],
)
def test_bad_moe_spaces_are_refused_naming_the_field(change, message) -> None:
    with pytest.raises(SpaceError, match=message):
        load_space({**SPACE, **change})


def test_a_mixture_scored_in_memory_scores_what_its_checkpoint_scores(zoo_dir, tmp_path) -> None:
    config = MoEConfig.model_validate(moe_config(zoo_dir, "cheap_embed", experts_per_token=2))
    objectives = [Objective(task=f"zoo_{s}", metric="acc", limit=30) for s in ("latin", "greek", "cyrillic")]
    evaluator = CandidateEvaluator(objectives, include_paths=[zoo_dir / "tasks"])
    in_memory = evaluator.evaluate(config)
    assert in_memory.ok, in_memory.reason
    on_disk = evaluator.evaluate_checkpoint(build_moe(config, tmp_path / "moe"))
    assert in_memory.objectives == on_disk.objectives and in_memory.items == on_disk.items


@pytest.mark.slow
def test_a_moe_search_runs_end_to_end_and_its_pick_is_assembled(zoo_dir, tmp_path) -> None:
    run_config = {
        "name": "moe-test",
        "zoo": str(zoo_dir),
        "search_space": str(ROOT / "search_spaces" / "zoo-moe.yaml"),
        "objectives": [{"task": f"zoo_{s}", "metric": "acc", "limit": 16} for s in ("latin", "greek", "cyrillic")],
        "optimizer": {"name": "nsga2", "population": 4, "budget": 8, "seed": 0},
        "runtime": {"workers": 0},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config, allow_unicode=True))
    runner = CliRunner()
    result = runner.invoke(app, ["search", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "moe" in result.output  # the summary names the kind of candidates
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--pick", "auto", "-o", str(tmp_path / "pick.yaml")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "pick.yaml").read_text()
    assert text.startswith("# A mixture of experts") and "experts:" in text
    result = runner.invoke(
        app,
        ["eval", str(tmp_path / "pick.yaml"), "--tasks", "zoo_latin", "--include-path", str(zoo_dir / "tasks")]
        + ["--split", "search", "--limit", "16", "--json"],
    )
    assert result.exit_code == 0, result.output  # evomerge eval assembles a mixture config in memory
    result = runner.invoke(app, ["moe", str(tmp_path / "pick.yaml"), str(tmp_path / "assembled")])
    assert result.exit_code == 0, result.output
    picked = candidate_from_dict(yaml.safe_load(text))
    evaluator = CandidateEvaluator(
        [Objective.model_validate(o) for o in run_config["objectives"]], include_paths=[zoo_dir / "tasks"]
    )
    assert evaluator.evaluate_checkpoint(tmp_path / "assembled").objectives == evaluator.evaluate(picked).objectives
    from evomerge.search.report import RunReport

    report = RunReport.load(tmp_path / "run")
    best = max(report.records, key=lambda r: min(r.objectives.values()) if r.ok else -1)
    assert best.method == "moe" and all(r.ok for r in report.records)


@pytest.mark.parametrize("bases", [["base", "ta"], "ta"])
def test_a_merge_can_be_the_mixtures_base(zoo_dir, tmp_path, monkeypatch, bases) -> None:
    """``stages:`` make a dense merge a base choice ("MoE from merged models"): merged once into the stage
    cache, decoded as that checkpoint, and the mixture on it is scored."""
    from evomerge.search.config import resolve_run_config

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    models = {s: str(zoo_dir / "models" / s) for s in ("base", "latin", "greek", "cyrillic")}
    merge = {
        "merge_method": "task_arithmetic",
        "base_model": models["base"],
        "models": [{"model": models[s], "parameters": {"weight": 0.5}} for s in ("latin", "greek", "cyrillic")],
    }
    (tmp_path / "ta.yaml").write_text(yaml.safe_dump(merge))
    space = {**SPACE, "base_model": bases, "stages": {"ta": {"recipe": "ta.yaml"}}}  # merged later, not yet
    run = resolve_run_config(
        {
            "zoo": str(zoo_dir),
            "search_space": space,
            "objectives": [{"task": "zoo_latin", "metric": "acc", "limit": 8}],
            "optimizer": {"name": "random", "budget": 2},
        },
        base_dir=tmp_path,
    )
    run.materialize_stages()
    genome = make_genome(run.space)
    x = np.full(genome.dim, 0.9)
    config = genome.decode(x)
    stage = Path(config.base_model)
    assert stage.parent == tmp_path / "stages" and stage.name.startswith("ta-") and (stage / "config.json").exists()
    evaluator = CandidateEvaluator(run.objectives, include_paths=run.include_paths)
    assert evaluator.evaluate(config).ok


def test_a_lora_adapter_can_be_an_expert(zoo_dir) -> None:
    """An expert named BASE+ADAPTER (the zoo's lora-<skill>) is read as the merges read it."""
    from evomerge.merge.moe import moe_tensors
    from evomerge.merge.plan import open_checkpoint

    adapter = f"{zoo_dir / 'models' / 'base'}+{zoo_dir / 'adapters' / 'latin'}"
    data = moe_config(zoo_dir, "cheap_embed")
    data["experts"][0]["source_model"] = adapter
    _, tensors = moe_tensors(MoEConfig.model_validate(data))
    stacked = dict(tensors)["model.layers.0.mlp.experts.down_proj"][0]
    expected = open_checkpoint(adapter).get("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(stacked, expected.to(stacked.dtype))

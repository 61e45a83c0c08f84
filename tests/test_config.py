"""search/config: errors name the field; round-1 run.yaml files still load."""

from __future__ import annotations

import pytest
from search_support import run_config

from evomerge.search.config import ConfigError, parse_duration, resolve_run_config


def test_config_errors_name_the_field(random_family, tmp_path) -> None:
    bad = run_config(random_family, tmp_path)
    bad["optimizer"]["population"] = 1
    with pytest.raises(ConfigError, match="optimizer.population"):
        resolve_run_config(bad, base_dir=tmp_path)
    bad = run_config(random_family, tmp_path)
    bad["objectives"][0].pop("metric")
    with pytest.raises(ConfigError, match=r"objectives\[0\].metric: required"):
        resolve_run_config(bad, base_dir=tmp_path)
    bad = run_config(random_family, tmp_path)
    bad["search_space"]["models"] = ["nonexistent-name"]
    with pytest.raises(ConfigError, match="neither a zoo name nor an existing directory"):
        resolve_run_config(bad, base_dir=tmp_path)
    bad = run_config(random_family, tmp_path)
    bad["optimizer"]["x0"] = 1.5
    with pytest.raises(ConfigError, match="optimizer.x0"):
        resolve_run_config(bad, base_dir=tmp_path)
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    with pytest.raises(ConfigError, match="expected a duration"):
        parse_duration("soon")


def test_round_1_runtime_test_hook_is_read_but_a_set_one_is_refused(random_family, tmp_path) -> None:
    """Round 1 wrote ``runtime.evaluator_factory: null`` into every run.yaml; the hook is gone."""
    old = run_config(random_family, tmp_path)
    old["runtime"]["evaluator_factory"] = None
    assert resolve_run_config(old, base_dir=tmp_path).to_dict()["runtime"].get("evaluator_factory") is None
    old["runtime"]["evaluator_factory"] = "fake_evaluators:quadratic"
    with pytest.raises(ConfigError, match="runtime.evaluator_factory"):
        resolve_run_config(old, base_dir=tmp_path)

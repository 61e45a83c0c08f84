"""Run configuration (``configs/*.yaml``): search space, optimizer, objectives, runtime, tracking.

Model references in the search space may be names from a toy zoo (``base``, ``latin``, …, and the
soup group's ``greek-soup1``, …) when a zoo is given: ``zoo:`` in the config, ``--set zoo=DIR``, or
``$EVOMERGE_ZOO_DIR`` (in that order); the zoo's task directory is then added to the include paths.
Anything else is a path, relative to the config file.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.eval.tasks import Objective, TaskError, objective_directions
from evomerge.recipe import DataItems, DataSection, Recipe
from evomerge.recipe.adapters import split_adapter_ref
from evomerge.search.space import ParameterSpace, SearchSpace, SpaceError, load_space
from evomerge.search.stages import StageError, materialize_stage, stage_checkpoint, stage_recipe


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field."""


SCREENING_OPTIMIZERS = ("cma", "nsga2", "random")
"""The optimizers a multi-fidelity run (``Objective.screen``) can drive: open-ended, generation by generation."""
DEFAULT_PROMOTE = 0.25


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    name: Literal["cma", "nsga2", "random", "sweep", "uniform_soup", "greedy_soup", "gradient"] = "nsga2"
    """cma, nsga2, random: searches of ``budget`` candidates; sweep (a grid over 1-2 genes and a
    quadratic fit), uniform_soup and greedy_soup (a linear space over a pool of checkpoints): finite
    plans that stop when done, or at ``budget`` if that comes first; gradient (a task-arithmetic space):
    the weights fitted by gradient descent on the objectives' items, then ``budget`` points of the
    fit's trajectory scored (AdaMerging-style; the baseline the evolutionary searches must beat)."""
    population: int = Field(default=8, ge=2)
    budget: int = Field(default=64, ge=1)
    """Candidates to score (cached duplicates count)."""
    sigma: float = Field(default=0.25, gt=0)
    """CMA-ES initial step size, in units of the [0,1] gene range."""
    x0: float | None = Field(default=None, ge=0, le=1)
    """CMA-ES and gradient start: every gene at this point of its [0,1] range (default 0.5, the centre
    of the box; e.g. 0.25 starts task-arithmetic weights in 0-2 at the hand-set 0.5)."""
    initial: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    """NSGA-II: members of the first population with every gene at one of these points of its [0,1]
    range (the rest of the population is drawn at random); over task-arithmetic weights in 0-2,
    [0.1667, 0.25, 0.5] are the hand-set merges linear, lambda 0.5 and lambda 1."""
    scalarize: Literal["weighted_sum", "worst"] = "weighted_sum"
    """CMA-ES, sweep and soups: how objectives become one value: their weighted sum, or the worst
    weighted one (a merge is as good as its weakest skill)."""
    grid: int | None = Field(default=None, ge=3)
    """sweep: points per gene (default 11 for one gene, 5 for two)."""
    steps: int | None = Field(default=None, ge=1)
    """gradient: Adam steps of the fit (default 100)."""
    lr: float | None = Field(default=None, gt=0)
    """gradient: Adam's step size in gene units (default 0.05)."""
    loss: Literal["nll", "entropy"] | None = None
    """gradient: ``nll`` (default; supervised: the items' reference answers) or ``entropy``
    (AdaMerging's unsupervised loss: the entropy of the model's answer distribution, no answers read)."""
    promote: float | None = Field(default=None, gt=0, le=1)
    """Multi-fidelity runs (an objective with ``screen``): the share of each generation, best first by the
    optimizer's own ranking of the screen scores, that is then scored on every item (default 0.25,
    at least one candidate)."""
    seed: int = 0
    mode: Literal["barrier", "async"] = "barrier"
    """barrier: a generation is asked, scored in parallel and told as a whole (same seed and scores, same
    candidates, for any number of workers); async: a candidate is asked whenever a worker frees up and
    told as its result arrives (no idle tail per generation; the candidates then depend on the order
    results arrive in, which the run dir records, so a resumed run still continues exactly)."""


class RuntimeConfig(_Strict):
    workers: int | None = Field(default=None, ge=0)
    """Ray workers; None: as many as the machine has CPUs (local) or GPUs (cluster); 0: in-process."""
    ray_address: str | None = None
    gpus_per_worker: float = Field(default=0.0, ge=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    timeout: float | None = Field(default=600.0, gt=0)
    """Seconds one candidate may take before it is retried once elsewhere, then failed."""
    time_limit: str | None = None
    """Wall-clock bound for the whole run, e.g. 8h, 90m, 3600s."""
    backend: Literal["fast", "lm-eval"] = "fast"
    device: str | None = None
    score_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype candidates are merged into and scored in; ``auto``: bfloat16 on CUDA, float32 on CPU."""
    resident_sources: Literal["auto", "on", "off"] = "auto"
    """Keep the source models' tensors on the scoring device between candidates, so a candidate is merged
    there without reading the checkpoints again: ``auto`` on CUDA when they fit in half its free memory
    (else the checkpoints, with a warning), ``on`` on any device, ``off``."""
    overlap: Literal["auto", "on", "off"] = "auto"
    """Ray workers take two candidates at once: one is merged into a second resident model (on CUDA, on
    a stream of its own) while the other is scored. ``auto``: on GPU workers (``gpus_per_worker`` > 0),
    where merging and scoring use different engines; ``on`` anywhere (on a CPU both stages share the
    cores); ``off``. The second model is made only if it fits (else one at a time, with a warning); the
    in-process executor (``workers: 0``) always runs one candidate at a time."""

    @model_validator(mode="before")
    @classmethod
    def _drop_round_1_test_hook(cls, data: Any) -> Any:
        """Round-1 run.yaml files carry ``evaluator_factory: null`` (a test hook since removed): still read them."""
        if isinstance(data, dict) and "evaluator_factory" in data and data["evaluator_factory"] is None:
            data = {k: v for k, v in data.items() if k != "evaluator_factory"}
        return data


class TrackingConfig(_Strict):
    uri: str | None = None
    experiment: str = "evomerge"


class RunConfig(_Strict):
    name: str | None = None
    zoo: str | None = None
    search_space: Union[str, dict[str, Any]]
    objectives: list[Objective] = Field(min_length=1)
    include_paths: list[str] = Field(default_factory=list)
    optimizer: OptimizerConfig = OptimizerConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _metrics_named(self) -> "RunConfig":
        for i, objective in enumerate(self.objectives):
            if objective.metric is None:
                raise ValueError(f"objectives[{i}].metric: required in a run config (e.g. acc)")
        return self


class ResolvedRun:
    """A validated config with its zoo, model paths, search space and objective directions resolved."""

    def __init__(self, config: RunConfig, raw: dict[str, Any], base_dir: Path):
        self.config = config
        self.raw = raw
        self.base_dir = base_dir
        self.zoo_dir = _zoo_dir(config.zoo, base_dir)
        zoo = json.loads((self.zoo_dir / "zoo.json").read_text()) if self.zoo_dir else None
        self.names: dict[str, str] = {}
        #: earlier stages this run reads: checkpoint path -> (stage name, recipe); see materialize_stages
        self.stages: dict[str, tuple[str, Recipe]] = {}
        if zoo is not None:
            self.names = {"base": str(self.zoo_dir / zoo["base"])}
            self.names.update({k: str(self.zoo_dir / v) for k, v in zoo["models"].items()})
            for skill, adapter in (zoo.get("adapters") or {}).items():  # LoRA specialists: lora-latin, ...
                self.names[f"lora-{skill}"] = f"{self.names['base']}+{self.zoo_dir / adapter}"
            for members in (zoo.get("soups") or {}).values():  # the soup group by directory name: greek-soup1, ...
                self.names.update(
                    {Path(m).name: str(self.zoo_dir / m) for m in members if Path(m).name not in self.names}
                )
        self.include_paths = [str(_path(p, base_dir)) for p in config.include_paths]
        if zoo is not None:
            self.include_paths.append(str(self.zoo_dir / zoo["include_path"]))
        space_data = config.search_space
        space_source = "search_space"
        if isinstance(space_data, str):
            space_path = _path(space_data, base_dir)
            space_source = str(space_path)
            try:
                space_data = yaml.safe_load(space_path.read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"search_space: cannot read {space_path}: {exc}") from None
        self.space_data: dict[str, Any] = self._resolve_models(dict(space_data), space_source)
        try:
            self.space: SearchSpace = load_space(self.space_data, source=space_source)
        except SpaceError as exc:
            raise ConfigError(str(exc)) from None
        self.objectives = list(config.objectives)
        if isinstance(self.space, ParameterSpace) and self.space.data_aware and self.space.data is None:
            self.space = self.space.model_copy(update={"data": self._objective_data()})
        self._check_optimizer_fits()
        self.weights = [o.weight for o in self.objectives]
        self._directions: list[str] | None = None

    def _objective_data(self) -> DataSection:
        """The objectives' items as a data section: what data-aware methods compute statistics on by default."""
        items = [
            DataItems(task=o.task, split=o.split, limit=o.limit, subset_seed=o.subset_seed) for o in self.objectives
        ]
        return DataSection(
            items=list({i.model_dump_json(): i for i in items}.values()), include_path=self.include_paths
        )

    def _check_optimizer_fits(self) -> None:
        from evomerge.search.registry import FINITE, SOUPS
        from evomerge.search.soups import check_soup_space

        optimizer = self.config.optimizer
        if optimizer.name in FINITE and optimizer.mode != "barrier":
            raise ConfigError(
                f"optimizer.mode: {optimizer.name} runs in barrier mode only (each step needs the previous one)"
            )
        self._check_screens()
        if optimizer.name in SOUPS:
            try:
                check_soup_space(self.space, optimizer.name)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if optimizer.grid is not None and optimizer.name != "sweep":
            raise ConfigError(f"optimizer.grid: only the sweep optimizer takes a grid, not {optimizer.name}")
        for key in ("steps", "lr", "loss"):
            if getattr(optimizer, key) is not None and optimizer.name != "gradient":
                raise ConfigError(f"optimizer.{key}: only the gradient optimizer takes it, not {optimizer.name}")
        if optimizer.name == "gradient":
            from evomerge.search.gradient import check_gradient_space

            try:
                check_gradient_space(self.space)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    @property
    def screening(self) -> bool:
        """A multi-fidelity run: some objective is scored first on a screen of its items."""
        return any(o.screen for o in self.objectives)

    def _check_screens(self) -> None:
        optimizer = self.config.optimizer
        if not self.screening:
            if optimizer.promote is not None:
                raise ConfigError(
                    "optimizer.promote: only a multi-fidelity run promotes; give an objective a screen "
                    "(e.g. screen: 20, the items each candidate is scored on first)"
                )
            return
        if optimizer.name not in SCREENING_OPTIMIZERS or optimizer.mode != "barrier":
            raise ConfigError(
                f"objectives[].screen: multi-fidelity scoring needs a generation to rank before promoting, so it "
                f"runs with optimizer.name {' / '.join(SCREENING_OPTIMIZERS)} in optimizer.mode barrier "
                f"(not {optimizer.name}, {optimizer.mode})"
            )
        selections: dict[tuple[Any, ...], tuple[str, int | None]] = {}
        for o in self.objectives:
            key = (o.task, o.split, o.limit, o.subset_seed)
            if key in selections and selections[key][1] != o.screen:
                raise ConfigError(
                    f"objectives: {o.label} and {selections[key][0]} score the same items of {o.task} "
                    f"({o.split}), so they take the same screen (now {o.screen} and {selections[key][1]})"
                )
            selections.setdefault(key, (o.label, o.screen))
            if o.screen and o.limit and o.screen >= o.limit:
                raise ConfigError(
                    f"objectives: {o.label}: screen {o.screen} is not fewer than its limit {o.limit}; "
                    "a screen is a subset of the objective's items"
                )

    @property
    def directions(self) -> list[str]:
        """Per objective, maximize or minimize: as configured, else as its lm-eval task declares."""
        if self._directions is None:
            try:
                self._directions = objective_directions(self.objectives, self.include_paths)
            except TaskError as exc:
                raise ConfigError(f"objectives: {exc}") from None
        return self._directions

    def _resolve_models(self, data: dict[str, Any], source: str) -> dict[str, Any]:
        stages = data.get("stages") or {}

        def resolve(ref: str) -> str:
            if ref in stages:
                try:
                    recipe = stage_recipe(ref, stages[ref], self.base_dir)
                except StageError as exc:
                    raise ConfigError(f"{source}: {exc}") from None
                checkpoint = str(stage_checkpoint(ref, recipe))
                self.stages[checkpoint] = (ref, recipe)
                return checkpoint
            if ref in self.names:
                return self.names[ref]
            adapted = split_adapter_ref(ref)
            if adapted is not None:  # BASE+ADAPTER, each part a zoo name or a directory
                return "+".join(resolve(part) for part in adapted)
            path = _path(ref, self.base_dir)
            if not path.exists():
                known = (
                    f" (zoo names: {', '.join(self.names)})"
                    if self.names
                    else " (no zoo given: set zoo, --set zoo=DIR or EVOMERGE_ZOO_DIR)"
                )
                raise ConfigError(f"{source}: model {ref!r} is neither a zoo name nor an existing directory{known}")
            return str(path)

        if "models" in data:
            data["models"] = [resolve(m) for m in data["models"]]
        if data.get("kind") == "moe":  # a mixture's base model(s) and experts: zoo names or directories
            bases = data.get("base_model")
            if isinstance(bases, str):
                data["base_model"] = resolve(bases)
            elif isinstance(bases, list):
                data["base_model"] = [resolve(b) if isinstance(b, str) else b for b in bases]
            data["experts"] = [
                {**e, "source_model": resolve(e["source_model"])}
                if isinstance(e, Mapping) and isinstance(e.get("source_model"), str)
                else e
                for e in data.get("experts") or []
            ]
        if isinstance(data.get("data"), Mapping):  # a data-aware space's items: zoo names and relative paths
            section = dict(data["data"])
            paths = section.get("include_path") or []
            section["include_path"] = [
                str(_path(p, self.base_dir)) for p in ([paths] if isinstance(paths, str) else paths)
            ] or list(self.include_paths)  # default: the run's task directories (the zoo's)
            section["items"] = [
                {**item, "models": [resolve(m) for m in item["models"]]}
                if isinstance(item, Mapping) and item.get("models")
                else item
                for item in section.get("items") or []
            ]
            data["data"] = section
        if data.get("kind") != "moe" and isinstance(data.get("base_model"), str) and data["base_model"]:
            data["base_model"] = resolve(data["base_model"])
        return data

    def materialize_stages(self) -> None:
        """Merge the earlier stages this run reads into the stage cache (once; the search's first step)."""
        for name, recipe in self.stages.values():
            materialize_stage(name, recipe)

    def to_dict(self) -> dict[str, Any]:
        """The run as it will execute (paths resolved): what is saved in the run dir and logged."""
        data = self.config.model_dump(mode="json")
        for objective, direction in zip(data["objectives"], self.directions):
            objective["direction"] = direction
        data["zoo"] = str(self.zoo_dir) if self.zoo_dir else None
        data["search_space"] = self.space.model_dump(mode="json")
        data["include_paths"] = self.include_paths
        return data


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> ResolvedRun:
    """Read a run config YAML, apply ``key=value`` overrides (dotted keys), validate and resolve."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (search_space, objectives, optimizer, ...)")
    return resolve_run_config(raw, base_dir=path.parent.resolve(), overrides=overrides, source=str(path))


def resolve_run_config(
    raw: Mapping[str, Any], *, base_dir: Path, overrides: Sequence[str] = (), source: str = "config"
) -> ResolvedRun:
    data = copy.deepcopy(dict(raw))
    for item in overrides:
        apply_override(data, item)
    data = _expand_env(data)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        from evomerge.recipe import _describe

        raise ConfigError(f"{source}: {_describe(exc)}") from None
    return ResolvedRun(config, data, base_dir)


def apply_override(data: dict[str, Any], item: str) -> None:
    """``optimizer.budget=200`` -> data["optimizer"]["budget"] = 200 (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optimizer.budget=200")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key such as optimizer.budget")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        where = f" ({exc.problem})" if getattr(exc, "problem", None) else ""
        raise ConfigError(f"--set {item!r}: the value is not valid YAML{where}; quote it or fix the brackets") from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` inside strings."""
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value) or None
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def _path(ref: str, base_dir: Path) -> Path:
    path = Path(ref).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _zoo_dir(configured: str | None, base_dir: Path) -> Path | None:
    candidate = configured or os.environ.get("EVOMERGE_ZOO_DIR")
    if not candidate:
        from evomerge.zoo.build import default_zoo_dir

        default = default_zoo_dir(0)
        return default if (default / "zoo.json").exists() else None
    path = _path(candidate, base_dir)
    if not (path / "zoo.json").exists():
        raise ConfigError(f"zoo: {path} has no zoo.json (build one with `evomerge zoo build {path}`)")
    return path


def parse_duration(text: str | None) -> float | None:
    """'8h', '90m', '45s', '1h30m', '3600' -> seconds."""
    if text is None:
        return None
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise ConfigError(f"time limit {text!r}: expected a duration such as 8h, 90m, 1h30m or 3600")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)

"""A mixture-of-experts assembly: mergekit-moe's config format (``evomerge moe CONFIG OUT_DIR``).

The dense models' MLPs become the experts of one Mixtral-style model; everything else (embeddings,
attention, norms, LM head) comes from the base model; each layer's router is set from prompts:

```yaml
base_model: path/or/zoo-name
gate_mode: hidden            # hidden | cheap_embed | random | uniform_random
dtype: float32               # default: the base's
experts_per_token: 2
experts:
  - source_model: latin
    positive_prompts: ["sub abc="]
    negative_prompts: []     # optional
    noise_scale: null        # optional: Gaussian noise added to the expert's MLP weights
    residual_scale: null     # optional: the expert's down_proj scaled
```
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.recipe.schema import RecipeError, _describe, content_hash, read_yaml

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")


class Expert(BaseModel):
    """One dense model whose MLPs become an expert, and the prompts that should be routed to it."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    """mergekit-moe's configuration (Mixtral output; shared experts are not part of Mixtral)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal["hidden", "cheap_embed", "random", "uniform_random"] = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = Field(default=2, ge=1)
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    @model_validator(mode="after")
    def _usable(self) -> MoEConfig:
        if self.shared_experts:
            raise ValueError(
                "shared_experts: the Mixtral output has none (mergekit writes them for Qwen/DeepSeek MoEs)"
            )
        if self.architecture and not "mixtral".startswith(self.architecture.lower()):
            raise ValueError(f"architecture: {self.architecture!r}; evomerge writes Mixtral (architecture: mixtral)")
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} experts given"
            )
        if self.gate_mode in ("hidden", "cheap_embed"):
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(
                        f"experts[{i}].positive_prompts: gate_mode {self.gate_mode} sets the router from them; give "
                        "one or more prompts that should go to this expert (or use gate_mode: random)"
                    )
            prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise ValueError("experts: every expert has the same prompts, so the router could not tell them apart")
        return self

    # --- as a search candidate (the same surface as a Recipe's) -------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, unset fields omitted (mergekit-moe style)."""
        return self.model_dump(mode="json", exclude_none=True)

    def content_hash(self) -> str:
        """Stable hash of the config's content (as ``Recipe.content_hash``)."""
        return content_hash(self.to_dict())

    def referenced_models(self) -> list[str]:
        """The base, then every expert's model, in first-mention order."""
        return list(dict.fromkeys([self.base_model, *(e.source_model for e in self.experts)]))

    def to_yaml(self) -> str:
        """YAML that ``evomerge moe`` and mergekit's ``mergekit-moe`` both read."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "moe config") -> MoEConfig:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise RecipeError(f"{source}: {_describe(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> MoEConfig:
        data = read_yaml(path)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{path}: {_describe(exc)}") from None


def is_moe(data: Mapping[str, Any]) -> bool:
    """Whether candidate data is a mixture-of-experts config (``experts:``) rather than a recipe."""
    return "experts" in data and "merge_method" not in data


def candidate_from_dict(data: Mapping[str, Any], *, source: str = "candidate") -> Any:
    """What a search candidate's data describes: a ``MoEConfig`` (``experts:``) or a ``Recipe``."""
    from evomerge.recipe.schema import Recipe

    return MoEConfig.from_dict(data, source=source) if is_moe(data) else Recipe.from_dict(data, source=source)

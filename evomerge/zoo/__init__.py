"""The toy model zoo: a tiny Llama base, specialists fine-tuned from it on distinct skills, and an lm-eval
task per skill. Deterministic from a seed and cached on disk (see docs/architecture.md and the README, "The toy model zoo")."""

from evomerge.zoo.build import RECIPE_VERSION, ZooConfig, build_zoo, default_zoo_dir, load_zoo
from evomerge.zoo.skills import SKILLS, Skill, get_skill

__all__ = ["RECIPE_VERSION", "SKILLS", "Skill", "ZooConfig", "build_zoo", "default_zoo_dir", "get_skill", "load_zoo"]

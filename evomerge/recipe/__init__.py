"""Recipes: mergekit's merge-configuration schema (``schema``) and the merge methods it validates
against (``methods``). Neither imports torch; the merge engine (``evomerge.merge``) depends on this
package, never the reverse.

Everything ``evomerge.recipe`` exported when it was one module is re-exported here.
"""

from evomerge.recipe.methods import (
    BOOL_PARAMS,
    MERGEKIT_METHODS,
    PARAM_RANGES,
    REQUIRED,
    SPECS,
    Algorithm,
    Consensus,
    MethodSpec,
    Sparsification,
    Statistic,
    get_method,
)
from evomerge.recipe.moe import MoEConfig, candidate_from_dict, is_moe
from evomerge.recipe.schema import (
    DTYPES,
    ConditionalParameter,
    DataItems,
    DataSection,
    InputModel,
    OutputSlice,
    Parameters,
    ParameterSetting,
    Recipe,
    RecipeError,
    Scalar,
    ScalarOrGradient,
    SliceSource,
    _describe,  # noqa: F401 (private, used by search/config.py and search/space.py)
    chain_to_yaml,
    evaluate_setting,
    load_recipe_chain,
    resolve,
    substitute_models,
)

__all__ = [
    "BOOL_PARAMS",
    "MERGEKIT_METHODS",
    "DTYPES",
    "PARAM_RANGES",
    "REQUIRED",
    "SPECS",
    "Algorithm",
    "ConditionalParameter",
    "Consensus",
    "DataItems",
    "DataSection",
    "InputModel",
    "MethodSpec",
    "MoEConfig",
    "OutputSlice",
    "ParameterSetting",
    "Parameters",
    "Recipe",
    "RecipeError",
    "Scalar",
    "ScalarOrGradient",
    "SliceSource",
    "Sparsification",
    "Statistic",
    "candidate_from_dict",
    "chain_to_yaml",
    "evaluate_setting",
    "get_method",
    "is_moe",
    "load_recipe_chain",
    "resolve",
    "substitute_models",
]

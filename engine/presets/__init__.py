"""Model x accelerator x role recipes for vLLM pods (arguments, environment, labels, resources)."""

from engine.presets.recipes import (
    CONNECTORS,
    DENSE_PRESETS,
    MODEL_REPOS,
    MOE_PRESETS,
    ROLES,
    SPECULATIVE,
    EngineGroup,
    EnginePreset,
    PodRecipe,
    Speculative,
    all_presets,
    preset,
)

__all__ = [
    "CONNECTORS", "DENSE_PRESETS", "MODEL_REPOS", "MOE_PRESETS", "ROLES", "SPECULATIVE", "EngineGroup",
    "EnginePreset", "PodRecipe", "Speculative", "all_presets", "preset",
]

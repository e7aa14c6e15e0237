"""Model x accelerator x role recipes for vLLM pods (arguments, environment, labels, resources)."""

from engine.presets.recipes import CONNECTORS, MODEL_REPOS, ROLES, EnginePreset, preset

__all__ = ["CONNECTORS", "MODEL_REPOS", "ROLES", "EnginePreset", "preset"]

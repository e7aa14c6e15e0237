"""The shared cost model (DESIGN.md: one cost model for simulator, scorers, admission and planner)."""

from engine.costmodel.profiles import (
    ACCELERATORS,
    LINKS,
    MODELS,
    AcceleratorProfile,
    Efficiency,
    LinkProfile,
    ModelProfile,
    resolve_accelerator,
    resolve_link,
    resolve_model,
)
from engine.costmodel.roofline import CostModel, Deployment, Roofline, default_deployment, prefill_pairs, step_seconds

__all__ = [
    "ACCELERATORS", "LINKS", "MODELS", "AcceleratorProfile", "CostModel", "Deployment", "Efficiency",
    "LinkProfile", "ModelProfile", "Roofline", "default_deployment", "prefill_pairs", "resolve_accelerator",
    "resolve_link", "resolve_model", "step_seconds",
]

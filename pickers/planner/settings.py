"""The live planner's configuration: the ``planner:`` section of the picker's YAML, validated at start.

    planner:
      interval_s: 30            # one decision per interval
      accelerators: "H100=2.49" # kinds it may buy, with prices; "" = the kinds of the pool's pods, default prices
      model_profile: ""         # cost-model profile; "" = the pool's pods'
      startup_s: 60             # how long a new pod takes to serve (the forecast looks this far ahead)
      slo: {ttft_ms: 2000, tpot_ms: 60, goal: 0.95}
      utilization: 0.8          # plan each pod to this share of its cost-model capacity within the SLO
      down_after_s: 480         # hysteresis: a lower size must hold this long before scaling down
      cooldown_s: 300           # no scale-down sooner than this after the last change
      min_replicas: 1           # per (role, accelerator) pool the planner sizes
      max_replicas: 64
      drain_timeout_s: 120      # longest a removed pod keeps its in-flight requests before it is released
      time_scale: 1.0           # wall seconds per pod second (simulated pods; kvswitch up sets it)
      target:                   # none: only the Prometheus gauges (KEDA/HPA scale on them)
        kubernetes:
          namespace: ""         # "": $POD_NAMESPACE / the service account's / default
          kubeconfig: null
          deployments: [{accelerator: H100, role: both, name: vllm-h100}]

Every mistake is one ``ConfigError`` naming the key (``planner.slo.goal: must be in (0, 1], got 2``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from pickers.framework import ConfigError
from pickers.planner.catalogue import Catalogue, parse_accelerators


class SloSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ttft_ms: float = 2000.0
    tpot_ms: float = 60.0
    goal: float = 0.95


class DeploymentRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The Deployment whose replicas are one pool's pods."""

    name: str
    accelerator: str = "H100"
    role: Literal["both"] = "both"


class KubernetesTargetSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    namespace: str = ""
    kubeconfig: str | None = None
    deployments: list[DeploymentRef] = []


class TargetSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kubernetes: KubernetesTargetSettings | None = None


class PlannerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    interval_s: float = 30.0
    accelerators: str = ""
    model_profile: str = ""
    startup_s: float = 60.0
    slo: SloSettings = msgspec.field(default_factory=SloSettings)
    utilization: float = 0.8
    down_after_s: float = 480.0
    cooldown_s: float = 300.0
    min_replicas: int = 1
    max_replicas: int = 64
    drain_timeout_s: float = 120.0
    time_scale: float = 1.0
    target: TargetSettings = msgspec.field(default_factory=TargetSettings)

    def catalogue(self, pool_kinds: list[str]) -> Catalogue:
        """The kinds on offer: ``accelerators``, else the pool's own kinds at their default prices."""
        text = self.accelerators or ",".join(dict.fromkeys(k.upper() for k in pool_kinds))
        if not text:
            raise ConfigError("planner.accelerators: the pool has no endpoints to take kinds from; name them, "
                              "e.g. accelerators: H100=2.49")
        try:
            return parse_accelerators(text, self.startup_s)
        except ValueError as exc:
            raise ConfigError(f"planner.accelerators: {exc}".replace("--accelerators: ", "")) from None


def _positive(where: str, value: float) -> None:
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"planner.{where}: must be a positive number, got {value}")


def _non_negative(where: str, value: float) -> None:
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"planner.{where}: must be >= 0, got {value}")


def planner_settings(raw: Any) -> PlannerSettings:
    """The ``planner:`` section (a mapping; ``{}`` = every default) -> settings, or one clear ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"planner: must be a mapping of settings, got {type(raw).__name__}")
    try:
        s = msgspec.convert(raw, PlannerSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"planner: {exc}") from None
    _positive("interval_s", s.interval_s)
    _positive("slo.ttft_ms", s.slo.ttft_ms)
    _positive("slo.tpot_ms", s.slo.tpot_ms)
    if not 0 < s.slo.goal <= 1:
        raise ConfigError(f"planner.slo.goal: must be in (0, 1], got {s.slo.goal}")
    if not 0 < s.utilization <= 1:
        raise ConfigError(f"planner.utilization: must be in (0, 1], got {s.utilization}")
    for key in ("startup_s", "down_after_s", "cooldown_s", "drain_timeout_s"):
        _non_negative(key, getattr(s, key))
    _positive("time_scale", s.time_scale)
    if s.min_replicas < 0:
        raise ConfigError(f"planner.min_replicas: must be >= 0, got {s.min_replicas}")
    if s.max_replicas < max(1, s.min_replicas):
        raise ConfigError(f"planner.max_replicas: must be >= 1 and >= min_replicas ({s.min_replicas}), "
                          f"got {s.max_replicas}")
    if s.accelerators:
        s.catalogue([])  # the kinds and prices parse (errors name the bad entry)
    if s.model_profile:
        from engine.costmodel import resolve_model

        try:
            resolve_model(s.model_profile)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"planner.model_profile: {exc}") from None
    k = s.target.kubernetes
    if k is not None:
        if not k.deployments:
            raise ConfigError("planner.target.kubernetes.deployments: name at least one Deployment "
                              "({name, accelerator, role})")
        seen: set[tuple[str, str]] = set()
        for i, d in enumerate(k.deployments):
            if not d.name:
                raise ConfigError(f"planner.target.kubernetes.deployments[{i}].name: empty")
            pool = (d.role, d.accelerator.upper())
            if pool in seen:
                raise ConfigError(f"planner.target.kubernetes.deployments[{i}]: a second Deployment for role "
                                  f"{d.role}, accelerator {d.accelerator}")
            seen.add(pool)
            if s.accelerators and d.accelerator.upper() not in s.catalogue([]).prices:
                raise ConfigError(f"planner.target.kubernetes.deployments[{i}].accelerator: {d.accelerator} is "
                                  f"not in planner.accelerators ({s.accelerators})")
    return s


__all__ = ["DeploymentRef", "KubernetesTargetSettings", "PlannerSettings", "SloSettings", "TargetSettings",
           "planner_settings"]

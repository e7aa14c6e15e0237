"""SimFleet: many simulated vLLM pods in one process, on one event loop, in real time.

    async with SimFleet([PodSpec(name="p0"), PodSpec(name="p1", role="decode")], time_scale=0.1) as fleet:
        fleet.pods[0].address             # "127.0.0.1:41235"
        fleet.pods[0].kv_events_endpoint  # "tcp://127.0.0.1:40111"
        fleet.pods[0].core / .faults / .crash() / .restart()

Fleet YAML (``load_fleet_config``)::

    time_scale: 1.0          # optional
    defaults: {model_profile: llama-3.1-8b, block_size: 16}   # optional, any PodSpec field
    pods:
      - {count: 2, role: prefill, accelerator: H200}
      - {count: 4, role: decode, accelerator: H100, name: dec}   # names dec-0..dec-3

Unknown keys are errors that name the key and where it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from engine.costmodel import resolve_accelerator, resolve_link, resolve_model
from engine.sim.core import ROLES
from engine.sim.server import SimPod
from engine.sim.spec import PodSpec
from engine.tokens.tokenizer import Tokenizer

__all__ = ["FleetConfig", "PodGroup", "PodSpec", "SimFleet", "load_fleet_config", "specs_from_config"]


class PodGroup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One line of the fleet file: ``count`` pods sharing these settings (any PodSpec field)."""

    count: int = 1
    name: str | None = None  # prefix; pods are named <name>-<i>
    model_name: str | None = None
    model_profile: str | None = None
    accelerator: str | None = None
    role: str | None = None
    block_size: int | None = None
    num_blocks: int | None = None
    tp: int | None = None
    ep: int | None = None
    seed: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    link: str | None = None
    kv_transfer_timeout_s: float | None = None
    event_format: str | None = None
    kv_events_topic: str | None = None
    eos_after: int | None = None
    max_pending: int | None = None


class FleetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pods: list[PodGroup]
    defaults: PodGroup | None = None
    time_scale: float | None = None
    host: str | None = None


def _check_spec(spec: PodSpec, where: str) -> None:
    try:
        resolve_model(spec.model_profile)
        resolve_accelerator(spec.accelerator)
        resolve_link(spec.link)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if spec.role not in ROLES:
        raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}, got {spec.role!r}")
    if spec.event_format not in ("map", "array"):
        raise ValueError(f"{where}.event_format: must be map or array, got {spec.event_format!r}")
    for key in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_pending"):
        if getattr(spec, key) <= 0:
            raise ValueError(f"{where}.{key}: must be positive")


def specs_from_config(cfg: FleetConfig, base: PodSpec | None = None) -> list[PodSpec]:
    """Expand groups into one PodSpec per pod (ports stay as in ``base``: 0 means pick free ones)."""
    base = base or PodSpec()
    defaults = {k: v for k, v in msgspec.structs.asdict(cfg.defaults or PodGroup()).items()
                if v is not None and k not in ("count", "name")}
    if cfg.host:
        defaults["host"] = cfg.host
    specs: list[PodSpec] = []
    for gi, group in enumerate(cfg.pods):
        if group.count < 0:
            raise ValueError(f"$.pods[{gi}].count: must not be negative")
        fields = dict(defaults)
        fields.update({k: v for k, v in msgspec.structs.asdict(group).items()
                       if v is not None and k not in ("count", "name")})
        prefix = group.name or fields.get("role") or base.role
        for i in range(group.count):
            spec = dataclasses.replace(base, name=f"{prefix}-{i}", **fields)
            _check_spec(spec, f"$.pods[{gi}]")
            specs.append(spec)
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"$.pods: duplicate pod names {sorted(dup)}; give groups distinct 'name' prefixes")
    return specs


def load_fleet_config(path: str | Path) -> FleetConfig:
    """Read and validate a fleet YAML file; errors name the bad key and its path."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return parse_fleet_config(data, str(path))


def parse_fleet_config(data: Any, source: str = "fleet config") -> FleetConfig:
    try:
        return msgspec.convert(data, FleetConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{source}: {exc}") from None


class SimFleet:
    """Start and stop a set of SimPods together; P/D pods find each other in process for KV release."""

    def __init__(
        self, specs: Sequence[PodSpec], time_scale: float = 1.0, tokenizer: Tokenizer | None = None
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("pod names must be unique")
        for i, s in enumerate(specs):
            _check_spec(s, f"pods[{i}]")
        self.time_scale = time_scale
        self.peers: dict[str, SimPod] = {}
        self.pods: list[SimPod] = [SimPod(s, tokenizer, time_scale, self.peers) for s in specs]
        self._started = False

    def __getitem__(self, name: str) -> SimPod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def by_role(self, role: str) -> list[SimPod]:
        return [p for p in self.pods if p.role == role]

    async def start(self) -> None:
        try:
            for p in self.pods:
                await p.start()
        except BaseException:
            await self.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        for p in self.pods:
            await p.stop()
        self._started = False

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

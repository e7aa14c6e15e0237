"""Fleet spec for the cluster simulator: N pods x (model profile, accelerator, role).

From flags (``--pods 16 --accelerator H100 --model-profile 8b``, ``--pd 4:12`` for 4 prefill + 12 decode
pods) or the real-time fleet's YAML file (engine/sim/fleet.py, parsed by its own ``load_fleet_config``)::

    defaults: {model_profile: llama-3.1-8b}     # optional
    pods:
      - {count: 4, role: prefill, accelerator: H100}
      - {count: 12, role: decode, accelerator: H100, max_num_seqs: 256, name: dec}

Fields the virtual-time simulator has no use for (ports, event format, ...) are ignored. Each pod gets a
stable address (10.<group>.<i>.<j>:8000) so it is a valid picker ``Endpoint``; ``label`` keeps its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.costmodel import CostModel, Deployment
from engine.costmodel.dataparallel import DataParallelCost
from engine.sim.core import ROLES, EngineConfig
from engine.sim.spec import speculative_for


@dataclass(slots=True)
class PodSpec:
    name: str  # the pod's address, ip:port
    role: str = "both"
    accelerator: str = "H100"
    model_profile: str = "llama-3.1-8b"
    tp: int | None = None
    ep: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    link: str | None = None  # None: the fleet's
    kv_transfer_timeout_s: float = 30.0
    label: str = ""
    dp: int = 1  # data-parallel attention ranks (engine cores) behind the pod's one address
    dp_balancer: str = "vllm"  # how the pod balances requests without a rank header (engine.sim.dpgroup)
    speculative: bool = False  # the model's speculative decoding (engine.presets.SPECULATIVE)

    def deployment(self) -> Deployment | None:
        if self.dp > 1:  # DP attention + EP experts over every rank's GPUs
            tp = self.tp or 1
            return Deployment(tp=tp, ep=self.ep or self.dp * tp)
        if self.tp is not None or self.ep is not None:
            return Deployment(tp=self.tp or 1, ep=self.ep or 1)
        return None

    def cost_model(self) -> CostModel:
        """The cost model of one engine core (one rank of a data-parallel pod)."""
        return self.group_cost().rank

    def group_cost(self) -> DataParallelCost:
        return DataParallelCost(self.model_profile, self.accelerator, self.deployment(), dp=self.dp)

    def engine_config(self, link: str, seed: int, index: int, kv_events: bool = True,
                      in_process: bool = False) -> EngineConfig:
        """The engine of pod ``index``; ``in_process``: its KV events go to a router in this process."""
        host, _, port = self.name.rpartition(":")
        return EngineConfig(
            block_size=self.block_size, num_blocks=self.num_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            role=self.role, link=self.link or link, kv_transfer_timeout_s=self.kv_transfer_timeout_s,
            engine_id=f"sim-{index}", hash_seed=seed * 1_000_003 + index,
            remote_host=host, remote_port=int(port), kv_events=kv_events, kv_events_in_process=in_process,
            speculative=speculative_for(self.model_profile) if self.speculative else None,
        )


@dataclass(slots=True)
class FleetSpec:
    pods: list[PodSpec] = field(default_factory=list)
    link: str = "rdma-400g"

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pods)

    def describe(self) -> str:
        groups: dict[tuple[str, str, str, int], int] = {}
        for p in self.pods:
            key = (p.role, p.model_profile, p.accelerator, p.dp)
            groups[key] = groups.get(key, 0) + 1
        return ", ".join(f"{n}x {m}/{a}{f' DP{dp}' if dp > 1 else ''} ({r})" for (r, m, a, dp), n in groups.items())


def _address(group: int, i: int) -> str:
    return f"10.{group % 256}.{i // 256 % 256}.{i % 256}:8000"


def fleet_from_flags(
    pods: int = 16, accelerator: str = "H100", model_profile: str = "8b", pd: str | None = None,
    link: str = "rdma-400g", **engine: Any,
) -> FleetSpec:
    """``pods`` aggregated pods, or with ``pd="P:D"`` P prefill and D decode pods (``pods`` ignored)."""
    groups: list[tuple[str, int]]
    if pd:
        try:
            p, d = (int(x) for x in pd.split(":"))
        except ValueError:
            raise ValueError(f"--pd must be P:D (two integers), got {pd!r}") from None
        if p <= 0 or d <= 0:
            raise ValueError("--pd needs at least one prefill and one decode pod")
        groups = [("prefill", p), ("decode", d)]
    else:
        if pods <= 0:
            raise ValueError("--pods must be at least 1")
        groups = [("both", pods)]
    spec = FleetSpec(link=link)
    for g, (role, n) in enumerate(groups):
        for i in range(n):
            spec.pods.append(PodSpec(_address(g, i), role, accelerator, model_profile, **engine))
    _check(spec)
    return spec


def load_fleet(path: str | Path, **overrides: Any) -> FleetSpec:
    """The real-time fleet's YAML (engine.sim.fleet) as a virtual-time fleet; ``overrides`` (flags that
    are not None) fill fields the file leaves unset."""
    from engine.sim.fleet import load_fleet_config, specs_from_config

    cfg = load_fleet_config(path)
    base = _spec_defaults(overrides)
    specs = specs_from_config(cfg, base)
    spec = FleetSpec()
    groups: dict[str, int] = {}
    for s in specs:
        prefix = s.name.rsplit("-", 1)[0]
        g = groups.setdefault(prefix, len(groups))
        i = sum(1 for p in spec.pods if p.label.rsplit("-", 1)[0] == prefix)
        spec.pods.append(PodSpec(
            _address(g, i), s.role, s.accelerator, s.model_profile, s.tp, s.ep, s.max_num_seqs,
            s.max_num_batched_tokens, s.max_model_len, s.block_size, s.num_blocks, s.link,
            s.kv_transfer_timeout_s, label=s.name, dp=s.dp_size, speculative=s.speculative,
        ))
    _check(spec)
    return spec


def _spec_defaults(overrides: dict[str, Any]) -> Any:
    import dataclasses

    from engine.sim.spec import PodSpec as RealtimeSpec

    names = {f.name for f in dataclasses.fields(RealtimeSpec)}
    return RealtimeSpec(**{k: v for k, v in overrides.items() if v is not None and k in names})


def _check(spec: FleetSpec) -> None:
    names = set()
    for p in spec.pods:
        if p.role not in ROLES:
            raise ValueError(f"pod {p.name}: role must be one of {ROLES}, got {p.role!r}")
        p.label = p.label or p.name
        if p.name in names:
            raise ValueError(f"pod name {p.name} is used twice")
        if p.dp < 1:
            raise ValueError(f"pod {p.name}: dp must be at least 1, got {p.dp}")
        names.add(p.name)
        p.cost_model()  # resolves the profile and accelerator names, fails loudly on a bad one
    if not any(p.role != "prefill" for p in spec.pods):
        raise ValueError("the fleet needs at least one pod that can decode")


__all__ = ["FleetSpec", "PodSpec", "fleet_from_flags", "load_fleet"]

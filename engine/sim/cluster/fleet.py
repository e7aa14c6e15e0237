"""Fleet spec for the cluster simulator: N pods x (model profile, accelerator, role).

From flags (``--pods 16 --accelerator H100 --model-profile 8b``, ``--pd 4:12`` for 4 prefill + 12 decode
pods) or a YAML file::

    link: rdma-400g            # optional, KV transfer link for P/D
    pods:
      - {count: 4, role: prefill, accelerator: H100, model_profile: 8b}
      - {count: 12, role: decode, accelerator: H100, model_profile: 8b, max_num_seqs: 256}

Each pod gets a stable address (10.<group>.<i>.<j>:8000) so it is a valid picker ``Endpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.costmodel import CostModel, Deployment
from engine.sim.core import ROLES, EngineConfig

_POD_KEYS = {
    "count", "role", "accelerator", "model_profile", "model", "tp", "ep", "max_num_seqs",
    "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks", "name",
}


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

    def cost_model(self) -> CostModel:
        dep = None
        if self.tp is not None or self.ep is not None:
            dep = Deployment(tp=self.tp or 1, ep=self.ep or 1)
        return CostModel(self.model_profile, self.accelerator, dep)

    def engine_config(self, link: str, seed: int, index: int) -> EngineConfig:
        host, _, port = self.name.rpartition(":")
        return EngineConfig(
            block_size=self.block_size, num_blocks=self.num_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            role=self.role, link=link, engine_id=f"sim-{index}", hash_seed=seed * 1_000_003 + index,
            remote_host=host, remote_port=int(port),
        )


@dataclass(slots=True)
class FleetSpec:
    pods: list[PodSpec] = field(default_factory=list)
    link: str = "rdma-400g"

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pods)

    def describe(self) -> str:
        groups: dict[tuple[str, str, str], int] = {}
        for p in self.pods:
            key = (p.role, p.model_profile, p.accelerator)
            groups[key] = groups.get(key, 0) + 1
        return ", ".join(f"{n}x {m}/{a} ({r})" for (r, m, a), n in groups.items())


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


def fleet_from_dict(raw: dict[str, Any], **overrides: Any) -> FleetSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("pods"), list) or not raw["pods"]:
        raise ValueError("fleet file: needs a non-empty 'pods' list")
    unknown = set(raw) - {"pods", "link"}
    if unknown:
        raise ValueError(f"fleet file: unknown key(s) {sorted(unknown)}; expected 'pods', 'link'")
    spec = FleetSpec(link=str(raw.get("link", "rdma-400g")))
    for g, item in enumerate(raw["pods"]):
        if not isinstance(item, dict):
            raise ValueError(f"fleet file: pods[{g}] must be a mapping")
        bad = set(item) - _POD_KEYS
        if bad:
            raise ValueError(f"fleet file: pods[{g}] has unknown key(s) {sorted(bad)}")
        item = {**item, **{k: v for k, v in overrides.items() if v is not None and k not in item}}
        count = int(item.pop("count", 1))
        name = item.pop("name", None)
        if "model" in item:
            item.setdefault("model_profile", item.pop("model"))
        if count <= 0:
            raise ValueError(f"fleet file: pods[{g}].count must be positive")
        for i in range(count):
            addr = name if (name and count == 1) else _address(g, i)
            spec.pods.append(PodSpec(addr, **item))
    _check(spec)
    return spec


def load_fleet(path: str | Path, **overrides: Any) -> FleetSpec:
    import yaml

    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return fleet_from_dict(raw, **overrides)


def _check(spec: FleetSpec) -> None:
    names = set()
    for p in spec.pods:
        if p.role not in ROLES:
            raise ValueError(f"pod {p.name}: role must be one of {ROLES}, got {p.role!r}")
        if p.name in names:
            raise ValueError(f"pod name {p.name} is used twice")
        names.add(p.name)
        p.cost_model()  # resolves the profile and accelerator names, fails loudly on a bad one
    if not any(p.role != "prefill" for p in spec.pods):
        raise ValueError("the fleet needs at least one pod that can decode")


__all__ = ["FleetSpec", "PodSpec", "fleet_from_dict", "fleet_from_flags", "load_fleet"]

"""The offline fleet search: the cheapest fleet the cost model says meets the SLO at a workload's peak.

Candidates (aggregated pods; each priced as pods x GPUs per pod x price per GPU-hour):

- one kind, each tensor-parallel size that fits (1, 2, 4): as many pods as ``pods_needed`` gives for the peak
  rate over the whole length distribution (its tail included);
- two pools split by prompt length: prompts longer than a threshold (the 50th..95th percentile) go to pool
  A, the rest to pool B, each sized for its own share of the rate and its own length distribution. Long
  prompts need fast prefill (TTFT) and short chats mostly decode (memory bandwidth), so a cheaper kind (or a
  smaller tensor-parallel size of the same kind) may carry one part. The attainment goal is over all
  requests, so the pools share its miss budget: the long pool may miss a share ``f`` of it (f in
  ``budget_shares``), the short pool the rest, each pool's goal being 1 - its misses / its share of requests
  (so the fleet's expected attainment is the goal). A split whose pools are one kind (TP sizes may differ)
  is a single-kind candidate: mixing kinds has to beat the best split of one kind too, not only one pool;
- prefill/decode disaggregated (``pd=True``): a prefill pool of one kind and TP size and a decode pool of
  another (or the same: a one-kind P/D fleet), every request prefilled on the first and decoded on the
  second (Splitwise: prefill is compute-bound, decode memory-bound, so the cheapest kind for each can
  differ). The prefill pool is sized by ``capacity.prefill_capacity`` (TTFT at the goal: wait + prefill on
  the prefill kind + the KV pull to the decode kind + one decode step at the decode pool's load), the decode
  pool by ``capacity.decode_capacity`` (TPOT with no prefill in its steps, KV and ``max_num_seqs`` bounds),
  both at the whole workload's rate and goal. P/D pools are not combined with length splits (bounded search).

The replay confirms the best few (engine/sim/cluster/plan.py); the search itself is pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pickers.planner.capacity import (
    LoadShape,
    PodKind,
    count_for,
    decode_capacity,
    decode_tpot,
    pods_needed,
    prefill_capacity,
)
from pickers.planner.catalogue import Catalogue


@dataclass(frozen=True, slots=True)
class Pool:
    """``count`` pods of one kind; ``min_input``/``max_input``: the prompt lengths it serves; ``role``: both
    (aggregated), or prefill / decode (the two pools of a disaggregated fleet)."""

    kind: PodKind
    count: int
    min_input: int = 0
    max_input: int | None = None
    role: str = "both"

    @property
    def gpus(self) -> int:
        return self.count * self.kind.gpus


@dataclass(frozen=True, slots=True)
class Candidate:
    pools: tuple[Pool, ...]
    cost_per_hour: float
    split_tokens: int | None = None  # prompts longer than this go to the first pool
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.kind.accelerator for p in self.pools))

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pools)

    @property
    def mixed(self) -> bool:
        """Two accelerator kinds (a split of one kind into two TP sizes is not mixed)."""
        return len(self.kinds) > 1

    def describe(self) -> str:
        parts = []
        for p in self.pools:
            rng = ""
            if p.max_input is not None:
                rng = f" (prompts <= {p.max_input})"
            elif p.min_input:
                rng = f" (prompts > {p.min_input})"
            role = f" {p.role}" if p.role != "both" else ""
            parts.append(f"{p.count}x {p.kind.accelerator} tp{p.kind.cost().deployment.tp}{role}{rng}")
        return " + ".join(parts)


def _price(pool: Pool, catalogue: Catalogue) -> float:
    return pool.gpus * catalogue.price(pool.kind.accelerator)


def search(inputs: list[int], outputs: list[int], peak_rate: float, catalogue: Catalogue, model: str,
           ttft_s: float, tpot_s: float, goal: float, hit_rate: float = 0.0, utilization: float = 0.9,
           tps: tuple[int, ...] = (1, 2, 4), splits: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95),
           budget_shares: tuple[float, ...] = (0.5, 0.8, 0.95), pd: bool = True,
           link: str = "rdma-400g") -> list[Candidate]:
    """Every feasible candidate, cheapest first (ties: fewer GPUs)."""
    if peak_rate <= 0 or not inputs:
        raise ValueError("the workload needs requests and a positive peak rate")
    if len(outputs) != len(inputs):
        raise ValueError(f"{len(inputs)} prompt lengths but {len(outputs)} output lengths")
    if not 0 < goal <= 1 or not ttft_s > 0 or not tpot_s > 0 or not 0 < utilization <= 1:
        raise ValueError("the goal and utilization must be in (0, 1] and the targets positive")
    kinds = [PodKind(k, model, tp) for k in catalogue.kinds for tp in tps if _fits(k, model, tp)]
    out: list[Candidate] = []
    shape = LoadShape.from_lengths(inputs, outputs, hit_rate)
    for kind in kinds:
        n = pods_needed(peak_rate, kind, shape, ttft_s, tpot_s, goal, utilization)
        if n is not None:
            pool = Pool(kind, n)
            out.append(Candidate((pool,), _price(pool, catalogue)))
    arr = np.asarray(inputs)
    outs = np.asarray(outputs)
    seen: set[tuple[object, ...]] = set()
    for q in splits:
        cut = int(np.quantile(arr, q))
        long_sel = arr > cut
        share = float(long_sel.mean())
        if share <= 0 or share >= 1:
            continue
        long_shape = LoadShape.from_lengths(arr[long_sel].tolist(), outs[long_sel].tolist(), hit_rate)
        short_shape = LoadShape.from_lengths(arr[~long_sel].tolist(), outs[~long_sel].tolist(), hit_rate)
        for f in budget_shares:
            goal_long, goal_short = split_goals(goal, share, f)
            for a in kinds:
                na = pods_needed(peak_rate * share, a, long_shape, ttft_s, tpot_s, goal_long, utilization)
                if na is None:
                    continue
                for b in kinds:
                    if b == a:
                        continue
                    nb = pods_needed(peak_rate * (1 - share), b, short_shape, ttft_s, tpot_s, goal_short,
                                     utilization)
                    if nb is None:
                        continue
                    pools = (Pool(a, na, min_input=cut), Pool(b, nb, max_input=cut))
                    key = (cut, pools[0].kind, na, pools[1].kind, nb)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(Candidate(pools, sum(_price(p, catalogue) for p in pools), split_tokens=cut,
                                         notes={"long_share": share, "goal_long": goal_long,
                                                "goal_short": goal_short}))
    if pd:
        out += disaggregated(kinds, shape, peak_rate, catalogue, ttft_s, tpot_s, goal, utilization, link)
    out.sort(key=lambda c: (round(c.cost_per_hour, 6), c.gpus))
    return out


def disaggregated(kinds: list[PodKind], shape: LoadShape, peak_rate: float, catalogue: Catalogue, ttft_s: float,
                  tpot_s: float, goal: float, utilization: float = 0.9, link: str = "rdma-400g"
                  ) -> list[Candidate]:
    """Every P/D candidate: a prefill pool of kind a and a decode pool of kind b (a == b: one kind), each
    sized for the whole rate (module docstring). The decode pods' first step is charged to TTFT: their
    step time (``decode_tpot``) at the rate per decode pod the decode pool is sized for."""
    dcap = {b: decode_capacity(b, shape, tpot_s) for b in kinds}
    out: list[Candidate] = []
    for b in kinds:
        nd = count_for(peak_rate, dcap[b], utilization)
        if nd is None:
            continue
        first_step = decode_tpot(b, shape, peak_rate / nd)
        for a in kinds:
            pcap = prefill_capacity(a, shape, ttft_s, goal, decode=b, first_step_s=first_step, link=link)
            na = count_for(peak_rate, pcap, utilization)
            if na is None:
                continue
            pools = (Pool(a, na, role="prefill"), Pool(b, nd, role="decode"))
            out.append(Candidate(pools, sum(_price(p, catalogue) for p in pools),
                                 notes={"prefill_capacity": pcap, "decode_capacity": dcap[b]}))
    return out


def split_goals(goal: float, long_share: float, budget_share: float) -> tuple[float, float]:
    """(long pool's goal, short pool's goal) when the long pool may miss ``budget_share`` of the fleet's miss
    budget (1 - goal) and the short pool the rest; each pool's misses over its own requests. Expected
    attainment: long_share x goal_long + (1 - long_share) x goal_short = goal (each clipped to [0.5, 0.9999]:
    a goal of 1 has no quantile)."""
    if not 0 < long_share < 1 or not 0 <= budget_share <= 1:
        raise ValueError("long_share must be in (0, 1) and budget_share in [0, 1]")
    miss = 1.0 - goal
    goal_long = 1.0 - budget_share * miss / long_share
    goal_short = 1.0 - (1.0 - budget_share) * miss / (1.0 - long_share)
    return max(0.5, min(goal_long, 0.9999)), max(0.5, min(goal_short, 0.9999))


def _fits(kind: str, model: str, tp: int) -> bool:
    try:
        return PodKind(kind, model, tp).cost().kv_capacity_tokens > 0
    except ValueError:  # the weights do not fit in tp GPUs of this kind
        return False


__all__ = ["Candidate", "Pool", "disaggregated", "search", "split_goals"]

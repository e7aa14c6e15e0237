"""Built-in profiles, selectable by name (``scheduler.profile``) and side by side in the benchmark.

Each is plain configuration, validated like a user's own profile.
"""

from __future__ import annotations

from typing import Any

# The gateway's subset hint is not a filter: the director applies it to every profile (pickers/director.py).
DECODE_FILTERS: list[Any] = ["health", {"type": "role", "role": "decode"}]

BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    # Expected TTFT from the cost model (prefix hit + queued prefill + decode load), the expected TPOT, a
    # TTFT-gated prefix bonus and KV pressure (no decode-stall charge: see pickers/plugins/score_ttft.py).
    # See pickers/plugins/score_ttft.py for the formula.
    # Prefix weight 2 within 2x the best TTFT (was 1 within 1.5x): a warm pod keeps its group while its TTFT is
    # up to 2x a cold pod's, so past the knee a hot group spills less and the fleet recomputes fewer shared
    # prefixes; below the knee the warm pod is the fastest anyway. Virtual-time curves, 3 seeds (README "The
    # default profile"): shared prefix at 2x the knee TTFT p90 0.97 -> 0.81 s, at 3x 13.8 -> 14.3 req/s;
    # multi-turn at 3x p90 0.49 -> 0.37 s (req/s 18.5 -> 18.1, peers <= 14.1); no-sharing unchanged.
    "default": {
        "filters": DECODE_FILTERS,
        "scorers": [
            {"type": "ttft", "weight": 3.0},
            # the decode step the request joins (pickers/plugins/score_tpot.py): below the knee a warm pod's
            # lowest TTFT kept every new conversation on the pods that held the system prompt (multi-turn at
            # 0.5x the knee: 2 of 4 pods took everything, TPOT 50 ms); weight 2 spreads them while the batch
            # there runs slower (TPOT 41 ms, TTFT p90 158 -> 139 ms, 1x 198 -> 159 ms); past the knee every
            # batch is full, the term is level and the curves are unchanged within the seed noise (README)
            {"type": "tpot", "weight": 2.0},
            # requests in flight while some pod has nothing queued (pickers/plugins/score_spread.py): below the
            # knee a pod that holds no shared prefix no longer stays idle (multi-turn at 0.5x the knee, 5 seeds:
            # TTFT p90 139 -> 131 ms, TPOT 41 -> 35 ms; at 1x 159 -> 152 ms); level past the knee
            {"type": "spread", "weight": 2.0},
            # a second copy of a hot group prefix on a quiet pod with nothing queued, while one pod holds it
            # (pickers/plugins/score_replicate.py): the group's bursts then have two warm pods to choose from
            # (shared-prefix, 5 seeds: TTFT p90 123 -> 97 ms at 0.5x the knee, 184 -> 169 ms at 1x); level past
            # the knee. Weight 5: the warm pod's lead from the ttft and prefix terms (3 + 2)
            {"type": "replicate", "weight": 5.0},
            {"type": "prefix", "mode": "auto", "gate_ttft_ratio": 2.0, "weight": 2.0},
            # KV use counting the prompt tokens queued for the pod (level past the knee; with plain usage the
            # Mooncake curve at 3x fell below round robin's req/s: pickers/plugins/score_kv_usage.py)
            {"type": "kv-usage", "weight": 1.0, "with_queue": True},
            # requests with SLO targets only (0 and no tiers for the rest): pods predicted to meet the targets
            # first, the best fit among them, else the least late (pickers/plugins/score_slo.py)
            {"type": "slo-fit", "weight": 2.0},
            # data-parallel ranks only (1 for every other endpoint): new prompt groups on the quietest rank, and
            # a rank past (1 + 0.05) x the ranks' mean of recent requests gives way (its group spills to a
            # replica). Weight 5, the ttft and prefix weights together (3 + 2): a rank past the bound loses at
            # least a warm rank's lead there (e2e/bench/dp.py, e2e/bench/results/2026-12-02-dp-moe-v2, run with
            # 4 = 3 + 1 when the prefix weight was 1)
            {"type": "rank-balance", "weight": 5.0},
        ],
        "picker": {"type": "max-score", "max_endpoints": 3},
        # Past the knee a request waits in the picker until some pod's queue has room, and is placed then
        # (pickers/flowcontrol.py): virtual-time curves, 5 seeds (README "Flow control")
        "flow_control": True,
    },
    "round-robin": {"filters": DECODE_FILTERS, "scorers": [], "picker": {"type": "round-robin"}},
    # Fewest requests in flight from this picker (random tie-break): the cheapest useful policy, and the
    # ext_proc path's baseline in the overhead benchmark. It reads nothing but its own counts (no health
    # filter: pod metrics are not consulted), so it also fronts upstreams that serve no /metrics.
    "least-inflight": {"filters": [{"type": "role", "role": "decode"}],
                       "scorers": [{"type": "inflight-requests", "weight": 1.0}], "picker": {"type": "max-score"}},
    "random": {"filters": DECODE_FILTERS, "scorers": [], "picker": {"type": "random"}},
    "load-only": {
        "filters": DECODE_FILTERS,
        "scorers": [{"type": "queue", "weight": 2.0}, {"type": "kv-usage", "weight": 2.0},
                    {"type": "inflight-tokens", "weight": 1.0}],
        "picker": {"type": "max-score"},
    },
    # The reference picker's defaults: queue 2, KV utilisation 2, (approximate) prefix 3.
    "approximate": {
        "filters": DECODE_FILTERS,
        "scorers": [{"type": "queue", "weight": 2.0}, {"type": "kv-usage", "weight": 2.0},
                    {"type": "prefix", "mode": "approximate", "weight": 3.0}],
        "picker": {"type": "max-score"},
    },
    # llm-d style precise prefix routing; degraded pods fall back to the approximate index.
    "precise": {
        "filters": DECODE_FILTERS,
        "scorers": [{"type": "queue", "weight": 2.0}, {"type": "kv-usage", "weight": 2.0},
                    {"type": "prefix", "mode": "auto", "weight": 3.0}],
        "picker": {"type": "max-score"},
    },
}

# The default profile seeing each data-parallel pod as one endpoint, as a router without rank support does:
# ranked endpoints are folded into their pods, no rank header is sent (the pod balances its ranks itself),
# metrics are summed over ranks and every rank's KV events count for the pod. A baseline, not a choice.
RANK_OBLIVIOUS = "rank-oblivious"
# The default profile over whole pods, without flow control: a pod's summed queue does not say whether one of
# its ranks has room, so holding on it would wait while a rank idles (pickers/flowcontrol.py).
BUILTIN_PROFILES[RANK_OBLIVIOUS] = {**BUILTIN_PROFILES["default"], "flow_control": False}


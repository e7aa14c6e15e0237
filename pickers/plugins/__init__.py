"""Every built-in plugin; importing this package registers them by name."""

from pickers.plugins import (  # noqa: F401
    admission_saturation,
    admission_slo,
    filter_health,
    filter_role,
    handler_decode_only,
    handler_prefill_decode,
    pick_max_score,
    pick_random,
    pick_round_robin,
    pick_weighted_random,
    score_inflight,
    score_kv_usage,
    score_lora,
    score_prefix,
    score_queue,
    score_rank_balance,
    score_running,
    score_session,
    score_slo,
    score_ttft,
)

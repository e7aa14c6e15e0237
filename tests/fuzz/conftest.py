"""Fuzz budget: a bounded slice in ``make test``; the full run on demand.

    KVSWITCH_FUZZ_EXAMPLES=35000 .venv/bin/python -m pytest -q -p no:randomly tests/fuzz -s

Each fuzz test runs that many generated inputs (default 300) and prints how many it ran.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("KVSWITCH_FUZZ_EXAMPLES", "300"))

settings.register_profile(
    "kvswitch-fuzz", max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)

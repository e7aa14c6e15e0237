"""A fresh picker compiles nothing in its first decisions: every numba kernel of the request path is loaded (or
compiled) with the types the path uses while the scheduler is built, not inside a client's request (a cold
numba cache made the first requests of a benchmark wait ~1.4 s)."""

from __future__ import annotations

from numba.core.registry import CPUDispatcher

import engine.costmodel.vector
import engine.kvcache.hashing
import engine.kvcache.rowtable
from pickers.types import Usage
from tests.pickers.helpers import request, scheduler

KERNEL_MODULES = (engine.costmodel.vector, engine.kvcache.rowtable, engine.kvcache.hashing)


def _compiled() -> dict[str, int]:
    """Signatures compiled so far, per kernel of the request path."""
    return {f"{m.__name__}.{name}": len(obj.signatures) for m in KERNEL_MODULES
            for name, obj in vars(m).items() if isinstance(obj, CPUDispatcher)}


def test_the_first_decisions_compile_no_kernel():
    s, clock = scheduler({"profile": "default"})
    before = _compiled()
    assert before["engine.costmodel.vector._prefill_split"] >= 1  # warmed while building
    for i, n in enumerate((40, 3000, 20_000)):  # short, medium and long prompts (several hundred blocks)
        d = s.decide(request(f"r{i}", list(range(7 * i, 7 * i + n))))
        clock.advance(0.05)
        s.on_first_token(d, clock.now())
        s.on_finished(d, Usage(prompt_tokens=n, completion_tokens=3), clock.now())
    assert _compiled() == before

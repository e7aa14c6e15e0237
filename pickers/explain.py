"""Turning a Decision's explanation into one short line (debug log, optional response header)."""

from __future__ import annotations

from pickers.types import Decision


def explain_text(decision: Decision, max_len: int = 1024) -> str:
    parts = [f"profile={decision.profile}"]
    if decision.prefill:
        parts.append(f"prefill={decision.prefill}")
    ranked = sorted(decision.explanation.items(), key=lambda kv: -kv[1].get("total", 0.0))
    for addr, scores in ranked:
        inner = " ".join(f"{k}={v:.3g}" for k, v in scores.items() if k != "total")
        parts.append(f"{addr} total={scores.get('total', 0.0):.3g}" + (f" ({inner})" if inner else ""))
    text = "; ".join(parts)
    return text if len(text) <= max_len else text[: max_len - 3] + "..."


def explain_header(decision: Decision, max_len: int = 512) -> str:
    """Header-safe (ASCII, no newlines) text for ``x-kvswitch-explanation``."""
    return explain_text(decision, max_len).encode("ascii", "replace").decode().replace("\n", " ")

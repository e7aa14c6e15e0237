"""Decode-only profile handler: run one profile over the director's candidates; no prefill leg."""

from __future__ import annotations

from pickers.framework import CycleContext, Param, Profile, ProfileHandler, register
from pickers.types import Decision


@register
class DecodeOnlyHandler(ProfileHandler):
    TYPE = "decode-only"
    reads_metrics = False
    PARAMS = {"profile": Param((str, type(None)), None, doc="profile to run (default: scheduler.profile)")}

    def handle(self, ctx: CycleContext, profiles: dict[str, Profile], default: str) -> Decision:
        name = self.profile or default
        res = profiles[name].run(ctx, ctx.candidates)
        ctx.state.results.append(res)
        return Decision(ctx.state, self.dl.endpoints.addresses(res.ranked), profile=name, decided_at=ctx.now)

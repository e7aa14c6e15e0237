"""Decode-only profile handler: run one profile over decode-capable pods; no prefill leg.

A prefill/decode handler plugs in beside it (KIND "handler"): run the decode profile, look at the chosen
pod's cached tokens (``ctx.hit_tokens``), then maybe run a prefill profile and return a Decision with
``prefill`` set. The scheduler learns the prompt's blocks for both pods and tracks both loads.
"""

from pickers.framework import Param, ProfileHandler, register
from pickers.types import Decision


@register
class DecodeOnlyHandler(ProfileHandler):
    TYPE = "decode-only"
    PARAMS = {"profile": Param((str, type(None)), None, doc="profile to run (default: scheduler.profile)")}

    def handle(self, ctx, profiles, default):
        name = self.profile or default
        res = profiles[name].run(ctx, self.dl.endpoints.active_slots())
        ctx.memo["results"] = [res]
        addr = self.dl.endpoints.address
        return Decision(request=ctx.request, endpoints=[addr(s) for s in res.ranked.tolist()], profile=name,
                        decided_at=ctx.now)

"""Session affinity: a request carrying ``header`` (default x-session-id) scores 1 on the pod that served
the session last, 0 elsewhere. The session table is a bounded LRU."""

from collections import OrderedDict

import numpy as np

from pickers.framework import Param, Scorer, register


@register
class SessionAffinityScorer(Scorer):
    TYPE = "session-affinity"
    PARAMS = {"header": Param(str, "x-session-id"), "max_sessions": Param(int, 100_000, min=1)}
    header: str
    max_sessions: int

    def __init__(self, **params):
        super().__init__(**params)
        self.header = self.header.lower()
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def score(self, ctx, cands):
        out = np.zeros(cands.size)
        sid = ctx.request.headers.get(self.header)
        if sid:
            addr = self._sessions.get(sid)
            slot = self.dl.endpoints.slot(addr) if addr else None
            if slot is not None:
                out[cands == slot] = 1.0
        return out

    def _remember(self, decision, address):
        sid = decision.request.headers.get(self.header)
        if sid:
            self._sessions[sid] = address
            self._sessions.move_to_end(sid)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def on_routed(self, decision):
        self._remember(decision, decision.primary)

    def on_served(self, decision, served):
        self._remember(decision, served)

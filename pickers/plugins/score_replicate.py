"""A second copy of a hot prefix while the fleet has room: 1 on the pods that should take the copy, 0 on the
rest; 1 on every pod (level) when none should.

A pod *holds* the request's prompt when at least ``held`` (half) of it is cached there (the prefix hits under
``mode``, ``auto`` by default: precise where the pod's KV events are healthy). The term acts only when all of
these hold:

- fewer than ``copies`` (2) candidates hold the prompt;
- the prefix is *hot*: of the last ``recent`` (256) requests held somewhere, at least ``hot`` (2) ended their
  cached prefix at the same block as this one. A system prompt or a document shared by a group of requests
  ends at the same block every time; a conversation's history ends at a new block every turn, so a
  conversation is never copied (it has one request in flight at a time and nothing to gain);
- a pod that does not hold it has no prompt tokens queued (the predictor's Q_p = 0) and ``gap`` (3) fewer
  requests in flight than the least busy holder: those pods get 1;
- the pool is below its knee: flow control holds nothing and has not, for ``quiet_s`` (10 s), found a request
  waiting on every pod (``DataLayer.saturated_at``; a profile without flow control is never quiet). Past the knee a
  pod with nothing queued is a moment between two requests, not a pod with time to spare: every pod's time is the
  pool's throughput, and a copy is one more cold prefill. Shared-prefix at 2x the knee, 5 seeds: without this test
  copies made in those moments brought the cold prefills to 30-32 per run (sglang-router 16) and TTFT p90 0.63 s
  against its 0.53 s; with it 16-18 and p90 0.50 s (e2e/bench/results/2026-12-03-vcurve1000-steproom/, with flow
  control's step room). 3 s instead of 10: 0.53 s; 0: 0.57 s; at 1x the knee 0.171-0.178 s whichever (bursts there
  fill every queue now and then, and the copies wait for the next quiet spell).

Why: below the knee the expected TTFT of a request whose group prefix one pod holds is lowest on that pod,
so a group stays on one pod, and its Poisson bursts queue there while other pods are idle. Round robin (every
group warm on every pod, arrivals on each pod far more regular) and vllm-router's kv_aware (which copies a group
once its holder is a few requests busier) had TTFT p90 97 and 101 ms on shared-prefix at half the knee against
the default's 123 ms, at the same hit rate per request. A second copy costs one cold prefill on a pod with
nothing queued and gives the group two warm pods, and the TTFT term then sends each request to the one with the
shorter queue (the power of two choices). Virtual time, 4 L40S pods, 1,000 requests, 5 seeds
(e2e/bench/results/2026-12-03-vcurve1000-replicate/): shared-prefix 0.5x p90 123 -> 97 ms, 1x 184 -> 169 ms
(lower in every seed), p99 +4 % and +8 % (16 more cold starts, in the top 2-3 %; within 1.1x of the best
peer's); every multi-turn, no-sharing and Mooncake run identical.
Tried and dropped (same curves): any number of copies while at most half the pods hold it (0.5x as good, at
the knee 3 copies per group and one pod's p90 at 470 ms), no hotness test (multi-turn 0.5x p90 131 -> 162 ms:
conversations were copied), a ratio (n_holder + 1) >= r (n_pod + 1) in place of the gap (0.5x p90 117-122 ms:
below the knee every pod runs ~11 requests, and the ratio seldom fires), a spread term weighing work as
kv_aware does (no change: the TTFT and prefix terms outvote it).

Weight 5 in the default profile: the warm pod's lead from the TTFT (3) and prefix (2) terms is what a copy has
to overcome, as for rank-balance. Past the knee the quiet test above keeps it level.

The copy itself (``warm_up``, default true): where a transport sends the picker's own prefills
(``DataLayer.warmups``: ``kvswitch serve`` and the simulator), the term stays level and offers a warm-up of the
group prefix (its whole blocks) to the least busy pod with room (pickers/warmup.py): this request goes where it
is fastest, and no user request pays the copy's cold prefill. Without a transport, or with ``warm_up: false``,
the pods with room get 1 and this request makes the copy. Shared-prefix at the knee, 400 requests: TTFT p90
494 -> 348 ms, at half the knee 311 -> 107 ms (README "The default profile"). The warm-up goes in pieces of
``piece_tokens`` (512), each when the one before has answered, so the copy pod's own requests wait for one
piece, not the whole prefix: at the knee, 400 requests, 348 -> 199 ms; at 1,000, 175 -> 166 ms.

Memory: a ring of ``recent`` block hashes and their counts (at most ``recent`` keys), per scorer instance.
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np

from pickers.framework import CycleContext, Param, PrefixModeScorer, register


@register
class ReplicateScorer(PrefixModeScorer):
    TYPE = "replicate"
    PARAMS = {
        **PrefixModeScorer.PARAMS,
        "copies": Param(int, 2, min=2, doc="copy a hot prefix while fewer pods than this hold it"),
        "gap": Param(float, 3.0, min=1.0, doc="in-flight requests the least busy holder has over the copy's pod"),
        "held": Param(float, 0.5, min=0.01, max=1.0, doc="a pod holds the prompt from this cached share on"),
        "hot": Param(int, 2, min=1, doc="hot: this many of the last `recent` held requests ended at its block"),
        "recent": Param(int, 256, min=1, max=65536),
        "quiet_s": Param(float, 10.0, min=0.0, doc="no copy this long after flow control saw every pod queued"),
        "warm_up": Param(bool, True, doc="make the copy with a warm-up prefill of the prefix (pickers/warmup.py) "
                         "where a transport sends one, not with this request"),
        "piece_tokens": Param(int, 512, min=0, doc="send the warm-up in pieces of about this many tokens, each "
                              "after the one before (the pod's own requests pass between them); 0: one piece"),
    }
    copies: int
    gap: float
    held: float
    hot: int
    recent: int
    quiet_s: float
    warm_up: bool
    piece_tokens: int

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self._ring: deque[int] = deque()
        self._count: Counter[int] = Counter()

    def heat(self, key: int) -> int:
        """How many of the last ``recent`` held requests ended their cached prefix at block ``key``; then
        counts this one."""
        seen = self._count[key]
        self._ring.append(key)
        self._count[key] += 1
        if len(self._ring) > self.recent:
            old = self._ring.popleft()
            self._count[old] -= 1
            if self._count[old] == 0:
                del self._count[old]
        return seen

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        level = np.ones(cands.size)
        p = ctx.prompt_tokens()
        if p <= 0 or cands.size < 2:
            return level
        dl = self.dl
        if self.quiet_s > 0 and (dl.held_requests > 0 or ctx.now - dl.saturated_at < self.quiet_s):
            return level
        hits = ctx.hit_tokens(self.mode)[cands]
        holder = hits >= self.held * p
        k = int(np.count_nonzero(holder))
        if k == 0 or k >= self.copies:
            return level
        # the block where the shortest holder's cached prefix ends: the group's shared prefix, or a new block
        bs = int(self.dl.endpoints.block_size[cands[holder][0]])
        depth = int(hits[holder].min()) // bs
        hashes = ctx.block_hashes(bs)
        if depth < 1 or depth > hashes.size or self.heat(int(hashes[depth - 1])) < self.hot:
            return level
        n = self.dl.inflight.requests[cands].astype(np.float64)
        pred = ctx.prediction(self.mode)
        room = ~holder & (pred.queued[cands] == 0) & (n + self.gap <= n[holder].min())
        if not room.any():
            return level
        warmups = self.dl.warmups
        if self.warm_up and warmups is not None:
            # the copy without this request: the prefix alone to the least busy pod with room (level here)
            idx = np.flatnonzero(room)
            slot = int(cands[idx[np.argmin(n[idx])]])
            ep = self.dl.endpoints.endpoints[slot]
            if ep is not None:
                warmups.offer(slot, ep, ctx.request.model, int(hashes[depth - 1]), ctx.token_ids()[: depth * bs],
                              ctx.now, float(pred.prefill_s[slot]), bs, self.piece_tokens)
            return level
        return room.astype(np.float64)

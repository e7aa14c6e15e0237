"""The real transport of the picker's warm-up prefills (pickers/warmup.py): each is a POST to its pod's OpenAI
completions endpoint (https where its /metrics are) with the prompt as token ids and ``max_tokens`` 1 (in pieces,
each posted when the one before has answered: ``Warmup.ends``), the way
vLLM takes a pre-tokenized prompt (the ids are the picker's own tokenization, the one whose block hashes match
the pod's KV events, so the pod caches the same blocks a user request of that group will look up).

Bounded: at most ``concurrency`` posts at once (the queue itself holds at most ``Warmups.max_in_flight``),
each within ``timeout_s``; every outcome goes back to the queue (``Warmups.done``), a failure too, so the pod's
in-flight count is released. ``stop`` cancels the loop and every post and awaits them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from pickers.warmup import Warmup, Warmups

log = logging.getLogger("kvswitch.pickers.warmup")


class WarmupSender:
    def __init__(self, warmups: Warmups, concurrency: int = 4, timeout_s: float = 30.0) -> None:
        self.warmups = warmups
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._posts: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        # offers come from decisions, which run on this loop (only hashing and tokenizing leave it)
        self.warmups.on_offer = self._wake.set
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvswitch warm-ups")

    async def _run(self) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        while True:
            await self._wake.wait()
            self._wake.clear()
            for w in self.warmups.take():
                await sem.acquire()
                task = asyncio.get_running_loop().create_task(self._post(w, sem))
                self._posts.add(task)
                task.add_done_callback(self._posts.discard)

    def body(self, w: Warmup, k: int) -> dict[str, Any]:
        """Piece ``k``'s request."""
        return {"model": w.model, "prompt": w.piece(k).tolist(), "max_tokens": 1, "temperature": 0.0,
                "stream": False}

    async def _post(self, w: Warmup, sem: asyncio.Semaphore) -> None:
        """The pieces one after another (each posted when the one before has answered); ok when all did."""
        ok = False
        try:
            assert self._session is not None
            headers = {"x-data-parallel-rank": str(w.dp_rank)} if w.dp_rank is not None else {}
            for k in range(len(w.ends)):
                sent = time.monotonic()
                async with self._session.post(f"{w.scheme}://{w.address}/v1/completions", json=self.body(w, k),
                                              headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        log.info("warm-up of %d tokens on %s: HTTP %d", w.ends[k], w.endpoint_id, resp.status)
                        break
                if self.warmups.piece_time is not None:
                    self.warmups.piece_time(time.monotonic() - sent)
            else:
                ok = True
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("warm-up of %d tokens on %s failed: %s", w.token_ids.size, w.endpoint_id, exc)
        finally:
            sem.release()
            self.warmups.done(w.request_id, ok)

    async def stop(self) -> None:
        self.warmups.on_offer = None
        tasks = [t for t in (self._task, *self._posts) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["WarmupSender"]

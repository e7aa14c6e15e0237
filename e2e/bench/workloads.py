"""Workloads as Mooncake-format traces, so one client (aiperf) replays every workload the same way.

A trace is a list of records ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``
(see /work/shared/data/README.md): one hash id per 512-token block of the prompt, the same id meaning the
same block of text. Two requests that share their first k ids share their first k*512 prompt tokens, which
is the only thing prefix caching needs. Every generator takes a seed and is deterministic for it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BLOCK_TOKENS = 512  # the block size Mooncake traces and aiperf's mooncake_trace loader use
DEFAULT_MOONCAKE_TRACE = Path("/work/shared/data/mooncake_synthetic_trace.jsonl")


@dataclass
class TraceRecord:
    """One request of a Mooncake trace."""

    timestamp: int  # ms from the start
    input_length: int
    output_length: int
    hash_ids: list[int]
    # Multi-turn only: the conversation the turn belongs to. Kept out of the written trace: aiperf would
    # group a session's turns and add their history itself, while hash_ids already carry the history.
    session_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("session_id")
        return out


@dataclass
class Workload:
    """A named trace plus the parameters that made it (kept in the report)."""

    name: str
    records: list[TraceRecord]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.records[-1].timestamp / 1000.0) if self.records else 0.0

    def write(self, path: Path) -> Path:
        """Write the trace as JSONL (what aiperf's --input-file reads), ids made single-sized (``aiperf_ids``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for rec, ids in zip(self.records, aiperf_ids(self.records)):
                f.write(json.dumps({**rec.to_json(), "hash_ids": ids}) + "\n")
        return path

    def stats(self) -> dict[str, float]:
        """Sizes and the share of prompt blocks seen before (an upper bound on the prefix hit rate)."""
        if not self.records:
            return {"requests": 0}
        seen: set[int] = set()
        reused = total = 0
        for rec in self.records:
            for h in rec.hash_ids:
                total += 1
                if h in seen:
                    reused += 1
                seen.add(h)
        inputs = [r.input_length for r in self.records]
        outputs = [r.output_length for r in self.records]
        return {
            "requests": len(self.records),
            "duration_s": self.duration_s,
            "mean_input": float(np.mean(inputs)),
            "mean_output": float(np.mean(outputs)),
            "max_input": int(max(inputs)),
            "reusable_block_share": reused / total if total else 0.0,
        }


def aiperf_ids(records: list[TraceRecord]) -> list[list[int]]:
    """Each record's hash ids with every id standing for one block size, as aiperf's trace loader requires
    (it writes an id's text once and refuses the id at another size).

    A prompt's last block may be partial. In the simulator a partial block is the first tokens of the full one,
    so a chat turn whose last block is partial shares those tokens with the next turn, which has the block in
    full (vLLM caches in 16-token blocks and shares them too). aiperf cannot express that: the partial use of an
    id that is also used in full gets an id of its own here (one per id and size), so through aiperf the next
    turn shares the previous turn's full blocks only (up to 511 tokens less reuse per turn than in the simulator).
    """
    def sizes(rec: TraceRecord) -> list[int]:
        n = len(rec.hash_ids)
        return [BLOCK_TOKENS] * (n - 1) + [max(1, rec.input_length - (n - 1) * BLOCK_TOKENS)] if n else []

    full = {h for rec in records for h, size in zip(rec.hash_ids, sizes(rec)) if size >= BLOCK_TOKENS}
    fresh = max((h for rec in records for h in rec.hash_ids), default=-1) + 1
    alias: dict[tuple[int, int], int] = {}
    out = []
    for rec in records:
        ids = []
        for h, size in zip(rec.hash_ids, sizes(rec)):
            if size < BLOCK_TOKENS and h in full:
                if (h, size) not in alias:
                    alias[(h, size)] = fresh
                    fresh += 1
                h = alias[(h, size)]
            ids.append(h)
        out.append(ids)
    return out


def num_blocks(tokens: int) -> int:
    """Hash ids a prompt of ``tokens`` tokens has (the last block may be partial)."""
    return max(1, math.ceil(tokens / BLOCK_TOKENS))


class _Ids:
    """Fresh, never repeated hash ids."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def poisson_times_ms(rng: np.random.Generator, n: int, rate: float) -> list[int]:
    """``n`` arrival times (ms) of a Poisson process with ``rate`` requests per second, the first at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return [int(round(t * 1000.0)) for t in np.cumsum(gaps)]


def shared_prefix(
    *,
    num_requests: int = 200,
    groups: int = 8,
    prefix_tokens: int = 4096,
    question_tokens: int = 512,
    output_tokens: int = 128,
    rate: float = 4.0,
    seed: int = 0,
) -> Workload:
    """Groups of requests with a long shared context (a system prompt or document) and their own question.

    The shared part is ``prefix_tokens // 512`` full blocks per group; the rest of the prompt (the
    remainder of the prefix plus the question) is made of blocks no other request has. Each request picks
    its group uniformly at random; arrivals are Poisson at ``rate`` requests per second.
    """
    if groups < 1 or num_requests < 1:
        raise ValueError("groups and num_requests must be >= 1")
    rng = np.random.default_rng(seed)
    ids = _Ids()
    shared_blocks = prefix_tokens // BLOCK_TOKENS
    group_ids = [ids.take(shared_blocks) for _ in range(groups)]
    input_length = prefix_tokens + question_tokens
    own_blocks = num_blocks(input_length) - shared_blocks
    times = poisson_times_ms(rng, num_requests, rate)
    choice = rng.integers(0, groups, size=num_requests)
    records = [
        TraceRecord(t, input_length, output_tokens, group_ids[int(g)] + ids.take(own_blocks))
        for t, g in zip(times, choice)
    ]
    params = dict(
        num_requests=num_requests, groups=groups, prefix_tokens=prefix_tokens,
        question_tokens=question_tokens, output_tokens=output_tokens, rate=rate, seed=seed,
    )
    return Workload("shared-prefix", records, params)


def no_sharing(
    *,
    num_requests: int = 200,
    rate: float = 4.0,
    input_median: int = 300,
    input_sigma: float = 0.9,
    output_median: int = 150,
    output_sigma: float = 0.8,
    max_input: int = 4096,
    max_output: int = 1024,
    seed: int = 0,
) -> Workload:
    """Independent prompts with ShareGPT-like lengths (lognormal), no block shared between requests."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    times = poisson_times_ms(rng, num_requests, rate)
    ins = np.clip(rng.lognormal(math.log(input_median), input_sigma, num_requests), 4, max_input).astype(int)
    outs = np.clip(rng.lognormal(math.log(output_median), output_sigma, num_requests), 1, max_output).astype(int)
    records = [
        TraceRecord(t, int(i), int(o), ids.take(num_blocks(int(i)))) for t, i, o in zip(times, ins, outs)
    ]
    params = dict(
        num_requests=num_requests, rate=rate, input_median=input_median, input_sigma=input_sigma,
        output_median=output_median, output_sigma=output_sigma, max_input=max_input,
        max_output=max_output, seed=seed,
    )
    return Workload("no-sharing", records, params)


def multi_turn(
    *,
    conversations: int = 40,
    turns: int = 4,
    system_tokens: int = 1024,
    first_user_tokens: int = 256,
    user_tokens: int = 128,
    output_tokens: int = 128,
    rate: float = 1.0,
    think_time_s: float = 5.0,
    seed: int = 0,
) -> Workload:
    """Chats: each turn's prompt is the previous turn's prompt extended (answer + new user message).

    Turn k's hash ids are turn k-1's hash ids followed by new ones, and its input length covers turn k-1's
    blocks in full, so the previous prompt is a prefix of the new one. All conversations share one system
    prompt (``system_tokens // 512`` blocks). Conversations start as a Poisson process at ``rate`` per
    second; a turn follows the previous one after a think time drawn uniformly in [0.5, 1.5] x
    ``think_time_s``, which should exceed the expected latency because the replay does not wait for answers.
    """
    rng = np.random.default_rng(seed)
    ids = _Ids()
    system = ids.take(system_tokens // BLOCK_TOKENS)
    starts = poisson_times_ms(rng, conversations, rate)
    records: list[TraceRecord] = []
    for c, start in enumerate(starts):
        t = float(start)
        length = system_tokens + first_user_tokens
        hash_ids = system + ids.take(num_blocks(length) - len(system))
        for _ in range(turns):
            records.append(TraceRecord(int(round(t)), length, output_tokens, list(hash_ids), f"conv-{c}"))
            # Next turn: all of this prompt's blocks (the last one now full), the answer, a new message.
            length = len(hash_ids) * BLOCK_TOKENS + output_tokens + user_tokens
            hash_ids = hash_ids + ids.take(num_blocks(length) - len(hash_ids))
            t += 1000.0 * think_time_s * float(rng.uniform(0.5, 1.5))
    records.sort(key=lambda r: r.timestamp)
    params = dict(
        conversations=conversations, turns=turns, system_tokens=system_tokens,
        first_user_tokens=first_user_tokens, user_tokens=user_tokens, output_tokens=output_tokens,
        rate=rate, think_time_s=think_time_s, seed=seed,
    )
    return Workload("multi-turn", records, params)


def read_trace(path: Path) -> list[TraceRecord]:
    out = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(TraceRecord(
                    int(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                    [int(h) for h in d["hash_ids"]], d.get("session_id"),
                ))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: not a Mooncake trace record ({exc})") from None
    return out


def mooncake(
    *,
    path: Path = DEFAULT_MOONCAKE_TRACE,
    num_requests: int | None = 200,
    start_ms: int = 0,
    speedup: float = 1.0,
    max_input_tokens: int | None = 16384,
    max_output_tokens: int | None = 512,
    seed: int = 0,
) -> Workload:
    """A window of a Mooncake trace, its clock ``speedup`` times faster, long prompts cut.

    Timestamps are shifted so the window starts at 0 and divided by ``speedup``. A prompt longer than
    ``max_input_tokens`` keeps its first blocks (so its shared prefix survives) and drops the rest. The
    seed is unused (the trace is fixed) and kept so every workload has the same knobs.
    """
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    records = [r for r in read_trace(path) if r.timestamp >= start_ms]
    if num_requests is not None:
        records = records[:num_requests]
    out = []
    t0 = records[0].timestamp if records else 0
    for r in records:
        length, hash_ids = r.input_length, r.hash_ids
        if max_input_tokens is not None and length > max_input_tokens:
            length = max_input_tokens
            hash_ids = hash_ids[: num_blocks(length)]
        output = min(r.output_length, max_output_tokens) if max_output_tokens else r.output_length
        out.append(TraceRecord(int(round((r.timestamp - t0) / speedup)), length, max(1, output), hash_ids))
    params = dict(
        path=str(path), num_requests=num_requests, start_ms=start_ms, speedup=speedup,
        max_input_tokens=max_input_tokens, max_output_tokens=max_output_tokens,
    )
    return Workload("mooncake", out, params)


def scale_rate(workload: Workload, factor: float) -> Workload:
    """The same requests arriving ``factor`` times faster (timestamps divided by ``factor``)."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    recs = [
        TraceRecord(int(round(r.timestamp / factor)), r.input_length, r.output_length, list(r.hash_ids),
                    r.session_id)
        for r in workload.records
    ]
    return Workload(workload.name, recs, {**workload.params, "rate_factor": factor})


def day_rate_shape(duration_s: float, peak_to_trough: float = 5.0, burst_at: float = 0.75,
                   burst_s: float = 120.0, burst_factor: float = 2.0, step_s: float = 1.0) -> np.ndarray:
    """Relative arrival rate per ``step_s`` of a compressed day, mean 1 over the day before the burst.

    A cosine from the night trough (t = 0 and the end) to the afternoon peak (t = duration / 2) whose
    peak/trough ratio is ``peak_to_trough``, times ``burst_factor`` for ``burst_s`` seconds starting at
    ``burst_at`` x duration (a flash crowd on top of the daily swing; ``burst_factor`` 1 disables it).
    """
    if duration_s <= 0 or step_s <= 0:
        raise ValueError("duration_s and step_s must be > 0")
    if peak_to_trough < 1:
        raise ValueError(f"peak_to_trough must be >= 1, got {peak_to_trough}")
    if burst_factor < 1 or burst_s < 0 or not 0 <= burst_at <= 1:
        raise ValueError("burst_factor must be >= 1, burst_s >= 0 and burst_at in [0, 1]")
    c = (peak_to_trough - 1.0) / (peak_to_trough + 1.0)
    t = (np.arange(int(math.ceil(duration_s / step_s))) + 0.5) * step_s
    shape = 1.0 - c * np.cos(2.0 * math.pi * t / duration_s)
    start = burst_at * duration_s
    shape[(t >= start) & (t < start + burst_s)] *= burst_factor
    return shape


def _synthetic_lengths(rng: np.random.Generator, n: int, long_share: float, chat_input_median: int,
                       chat_output_median: int, long_input_median: int, long_output_median: int,
                       max_input: int, max_output: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input, output, is_long) of a two-class mix: chat turns and long prompts (documents, code)."""
    is_long = rng.random(n) < long_share
    ins = np.where(is_long, rng.lognormal(math.log(long_input_median), 0.5, n),
                   rng.lognormal(math.log(chat_input_median), 0.8, n))
    outs = np.where(is_long, rng.lognormal(math.log(long_output_median), 0.6, n),
                    rng.lognormal(math.log(chat_output_median), 0.7, n))
    return (np.clip(ins, 16, max_input).astype(int), np.clip(outs, 1, max_output).astype(int), is_long)


def day(
    *,
    path: Path | str | None = None,
    num_requests: int = 12000,
    duration_s: float = 3600.0,
    peak_to_trough: float = 5.0,
    burst_at: float = 0.75,
    burst_s: float = 120.0,
    burst_factor: float = 2.0,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    long_share: float = 0.2,
    chat_input_median: int = 1500,
    chat_output_median: int = 250,
    long_input_median: int = 12000,
    long_output_median: int = 120,
    groups: int = 32,
    prefix_tokens: int = 1024,
    seed: int = 0,
) -> Workload:
    """A compressed day: ``num_requests`` arrivals over ``duration_s`` whose rate follows ``day_rate_shape``.

    Arrival times are the order statistics of ``num_requests`` points drawn from the day's rate curve (a
    Poisson process conditioned on its count, by inverting the cumulative rate), so the count is exact and
    the seed reproduces them. Lengths and prefix structure: with ``path``, the Mooncake-format trace's
    requests in their own order, cycled as often as needed; each pass gets fresh hash ids (ids offset by
    pass x (max id + 1)), so a repeat is new content and prefix reuse stays what the trace has. Without
    ``path``, a synthetic two-class mix: chat turns (lognormal around ``chat_*_median``; every chat request
    starts with one of ``groups`` shared system prompts of ``prefix_tokens``) and, with probability
    ``long_share``, long prompts (around ``long_*_median``, no sharing).
    """
    if num_requests < 1:
        raise ValueError("num_requests must be >= 1")
    if not 0.0 <= long_share <= 1.0:
        raise ValueError(f"long_share must be in [0, 1], got {long_share}")
    rng = np.random.default_rng(seed)
    shape = day_rate_shape(duration_s, peak_to_trough, burst_at, burst_s, burst_factor)
    step = duration_s / len(shape)
    cum = np.concatenate([[0.0], np.cumsum(shape)])
    u = np.sort(rng.random(num_requests)) * cum[-1]
    times_s = np.interp(u, cum, np.arange(len(cum)) * step)
    times_ms = np.round((times_s - times_s[0]) * 1000.0).astype(np.int64)
    records: list[TraceRecord] = []
    if path is not None:
        src = read_trace(Path(path))
        if not src:
            raise ValueError(f"{path}: the trace is empty")
        src.sort(key=lambda r: r.timestamp)
        stride = max((max(r.hash_ids) for r in src if r.hash_ids), default=0) + 1
        for i, t in enumerate(times_ms.tolist()):
            r = src[i % len(src)]
            off = (i // len(src)) * stride
            length, ids = r.input_length, [h + off for h in r.hash_ids]
            if max_input_tokens is not None and length > max_input_tokens:
                length = max_input_tokens
                ids = ids[: num_blocks(length)]
            out = min(r.output_length, max_output_tokens) if max_output_tokens else r.output_length
            records.append(TraceRecord(int(t), length, max(1, out), ids))
    else:
        ids = _Ids()
        shared = prefix_tokens // BLOCK_TOKENS
        group_ids = [ids.take(shared) for _ in range(max(1, groups))]
        ins, outs, is_long = _synthetic_lengths(
            rng, num_requests, long_share, chat_input_median, chat_output_median, long_input_median,
            long_output_median, max_input_tokens or 32768, max_output_tokens or 2048)
        choice = rng.integers(0, len(group_ids), size=num_requests)
        for t, n_in, n_out, lng, g in zip(times_ms.tolist(), ins.tolist(), outs.tolist(), is_long.tolist(),
                                          choice.tolist()):
            if lng or shared == 0:
                hid = ids.take(num_blocks(n_in))
            else:
                n_in = max(n_in, shared * BLOCK_TOKENS + 16)
                hid = group_ids[g] + ids.take(num_blocks(n_in) - shared)
            records.append(TraceRecord(int(t), int(n_in), int(n_out), hid))
    params = dict(
        path=str(path) if path is not None else None, num_requests=num_requests, duration_s=duration_s,
        peak_to_trough=peak_to_trough, burst_at=burst_at, burst_s=burst_s, burst_factor=burst_factor,
        max_input_tokens=max_input_tokens, max_output_tokens=max_output_tokens, seed=seed,
    )
    if path is None:
        params.update(long_share=long_share, chat_input_median=chat_input_median,
                      chat_output_median=chat_output_median, long_input_median=long_input_median,
                      long_output_median=long_output_median, groups=groups, prefix_tokens=prefix_tokens)
    return Workload("day", records, params)


GENERATORS = {
    "shared-prefix": shared_prefix,
    "no-sharing": no_sharing,
    "multi-turn": multi_turn,
    "mooncake": mooncake,
    "day": day,
}


def make(name: str, rate: float | None = None, **params: Any) -> Workload:
    """A workload by name. ``rate`` (requests/s) sets the arrival rate; for mooncake it sets the speedup
    so the window's mean rate equals ``rate``."""
    if name not in GENERATORS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(GENERATORS)}")
    if name == "mooncake":
        wl = mooncake(**params)
        if rate is not None and len(wl.records) > 1 and wl.duration_s > 0:
            wl = scale_rate(wl, rate / ((len(wl.records) - 1) / wl.duration_s))
            wl.params["rate"] = rate
        return wl
    if name == "day":
        if rate is not None:  # the day's mean rate: as many requests as the duration holds at that rate
            params["num_requests"] = max(1, int(round(rate * float(params.get("duration_s", 3600.0)))))
        return day(**params)
    if rate is not None:
        params["rate"] = rate
    return GENERATORS[name](**params)


"""The demo's workload: groups of users sharing a long system prompt, short questions, Poisson arrivals,
sent through Envoy with the ``openai`` SDK (streaming completions and chat), one result per request.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import openai

from engine.tokens.tokenizer import Tokenizer

ENDPOINT_HEADER = "x-kvswitch-endpoint"
PREFILL_HEADER = "x-kvswitch-prefill-endpoint"

_WORDS = ("cluster request latency token cache prefix decode prefill gateway envoy route policy budget replica "
          "memory block tensor batch stream answer question customer order invoice refund account billing "
          "shipping warehouse contract clause partner ticket incident metric alert dashboard release feature "
          "design review schedule meeting summary report careful concise helpful polite accurate always never "
          "please explain describe compare list check verify confirm escalate").split()
_TOPICS = ("refunds", "shipping delays", "password resets", "invoices", "API rate limits", "data exports",
           "account deletion", "plan upgrades", "GPU quotas", "contract renewals", "security reviews", "outages")
_ASKS = ("How do I handle {t}?", "What is our policy on {t}?", "Summarise the rules for {t} in two lines.",
         "A customer asks about {t}; what should I reply?", "Which team owns {t}?", "Give me a checklist for {t}.")


@dataclass(frozen=True)
class WorkloadSpec:
    requests: int = 120
    groups: int = 8
    system_tokens: int = 2048
    rate: float = 2.0  # mean arrivals per second (Poisson)
    concurrency: int = 16
    max_tokens: tuple[int, int] = (16, 64)
    chat_share: float = 0.5
    seed: int = 7
    timeout_s: float = 60.0


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    at: float  # seconds after the start
    group: int
    chat: bool
    question: str
    max_tokens: int


@dataclass
class RequestResult:
    index: int
    group: int
    api: str  # "completions" | "chat"
    endpoint: str | None = None
    prefill_endpoint: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_chunks: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None


@dataclass
class Workload:
    spec: WorkloadSpec
    system_prompts: list[str]
    plan: list[PlannedRequest]
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0


def system_prompt(group: int, tokens: int, tokenizer: Tokenizer, seed: int) -> str:
    """About ``tokens`` tokens of instructions, different per group and fixed per (group, seed)."""
    rng = random.Random(seed * 1000 + group)
    text = f"You are the assistant of support team {group}. Follow the handbook below.\n"
    while len(tokenizer.encode(text)) < tokens:
        text += " ".join(rng.choice(_WORDS) for _ in range(64)) + ".\n"
    return text


def build_workload(spec: WorkloadSpec, tokenizer: Tokenizer) -> Workload:
    rng = random.Random(spec.seed)
    prompts = [system_prompt(g, spec.system_tokens, tokenizer, spec.seed) for g in range(spec.groups)]
    plan, at = [], 0.0
    for i in range(spec.requests):
        plan.append(PlannedRequest(
            index=i, at=at, group=rng.randrange(spec.groups), chat=rng.random() < spec.chat_share,
            question=rng.choice(_ASKS).format(t=rng.choice(_TOPICS)) + f" (ticket {rng.randrange(10**6)})",
            max_tokens=rng.randint(*spec.max_tokens),
        ))
        at += rng.expovariate(spec.rate)
    return Workload(spec, prompts, plan)


async def _one(client: openai.AsyncOpenAI, model: str, wl: Workload, req: PlannedRequest) -> RequestResult:
    res = RequestResult(req.index, req.group, "chat" if req.chat else "completions")
    system = wl.system_prompts[req.group]
    t0 = time.perf_counter()
    try:
        call: Any  # a chat or a completions stream: different types, read the same way below
        if req.chat:
            call = client.chat.completions.with_streaming_response.create(
                model=model, max_tokens=req.max_tokens, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "system", "content": system}, {"role": "user", "content": req.question}])
        else:
            call = client.completions.with_streaming_response.create(
                model=model, max_tokens=req.max_tokens, stream=True, stream_options={"include_usage": True},
                prompt=f"{system}\nUser: {req.question}\nAssistant:")
        async with call as resp:
            res.endpoint = resp.headers.get(ENDPOINT_HEADER)
            res.prefill_endpoint = resp.headers.get(PREFILL_HEADER)
            async for chunk in await resp.parse():
                if chunk.choices:
                    c = chunk.choices[0]
                    text = c.delta.content if req.chat else c.text
                    if text:
                        res.output_chunks += 1
                        if res.ttft_s is None:
                            res.ttft_s = time.perf_counter() - t0
                if chunk.usage is not None:
                    res.prompt_tokens = chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    res.cached_tokens = getattr(details, "cached_tokens", None) if details else None
        res.e2e_s = time.perf_counter() - t0
        if res.output_chunks == 0:
            res.error = "empty stream"
    except openai.APIStatusError as exc:
        res.error = f"HTTP {exc.status_code}: {str(exc.message)[:120]}"
        res.endpoint = res.endpoint or exc.response.headers.get(ENDPOINT_HEADER)
    except (TimeoutError, openai.APIError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {str(exc)[:120]}"
    return res


async def run_workload(base_url: str, model: str, wl: Workload, progress: bool = False) -> Workload:
    """Send the plan on schedule (Poisson), at most ``concurrency`` at a time; fills ``wl.results``."""
    spec = wl.spec
    sem = asyncio.Semaphore(spec.concurrency)
    done = 0
    client = openai.AsyncOpenAI(base_url=base_url, api_key="kvswitch-local", max_retries=0,
                                timeout=spec.timeout_s)

    async def send(req: PlannedRequest, start: float) -> RequestResult:
        nonlocal done
        delay = start + req.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            r = await _one(client, model, wl, req)
        done += 1
        if progress and (done % max(1, spec.requests // 10) == 0 or done == spec.requests):
            print(f"  {done}/{spec.requests} done", flush=True)
        return r

    start = time.perf_counter()
    try:
        wl.results = list(await asyncio.gather(*(send(r, start) for r in wl.plan)))
    finally:
        await client.close()
    wl.wall_s = time.perf_counter() - start
    return wl

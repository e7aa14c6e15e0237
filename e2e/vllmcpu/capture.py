"""Capture what a real vLLM server says, for e2e/vllm_facts.md and for checking the simulator.

    .venv/bin/python -m e2e.vllmcpu.capture                       # starts its own server (tiny model)
    .venv/bin/python -m e2e.vllmcpu.capture --base-url http://127.0.0.1:PORT --kv tcp://127.0.0.1:ZPORT \
        --model tiny --tokenizer DIR

Prints markdown with the real JSON: metric families and labels, histogram buckets, cache_config_info,
response bodies and SSE chunks, error bodies, KV-event messages, ExampleConnector kv_transfer_params.
The functions are used by the tests too (same requests for vLLM and the simulator).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# The prompts both vLLM and the simulator get. Long enough for ~300 tokens (several 16-token blocks, more
# than two 128-token CPU blocks).
LONG_PROMPT = " ".join(
    f"Request {i} asks the picker to route the cache token prefix to a decode pod with low latency."
    for i in range(13)
)
SHORT_PROMPT = "Hello, how are you?"
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the picker."},
]


# -- HTTP ---------------------------------------------------------------------------------------------------
def request(base_url: str, method: str, path: str, body: Any = None, raw: bytes | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_json(base_url: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    status, _, data = request(base_url, "POST", path, body=body, raw=raw)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


def sse(base_url: str, path: str, body: Any, timeout: float = 60.0) -> tuple[int, dict[str, str], list[str]]:
    """The ``data:`` payloads of a streamed response, in order (``[DONE]`` included, as text)."""
    status, headers, data = request(base_url, "POST", path, body=body, timeout=timeout)
    out = []
    for line in data.decode().splitlines():
        if line.startswith("data:"):
            out.append(line[5:].strip())
        elif line.strip():
            out.append("NON-DATA LINE: " + line)
    return status, headers, out


# -- metrics ------------------------------------------------------------------------------------------------
def metric_families(text: str, prefix: str = "vllm:") -> dict[str, dict[str, Any]]:
    """{family: {type, label_keys, buckets?}} for every family whose name starts with ``prefix``."""
    out: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(prefix):
            continue
        keys: set[str] = set()
        buckets: list[str] = []
        for s in fam.samples:
            labels = dict(s.labels)
            if s.name.endswith("_bucket"):
                le = labels.pop("le")
                if le not in buckets:
                    buckets.append(le)
            keys.update(labels)
        info: dict[str, Any] = {"type": fam.type, "label_keys": sorted(keys),
                                "samples": sorted({s.name for s in fam.samples})}
        if buckets:
            info["buckets"] = buckets
        out[fam.name] = info
    return out


def metric_value(text: str, sample: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# -- shapes -------------------------------------------------------------------------------------------------
def shape(value: Any) -> Any:
    """The shape of a JSON value: maps keep keys (recursively), lists the union of item shapes, leaves a type."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [shape(v) for v in value]
        uniq = []
        for it in items:
            if it not in uniq:
                uniq.append(it)
        return uniq
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def shorten(value: Any, limit: int = 60) -> Any:
    """Long strings and lists cut short, so pasted JSON stays readable."""
    if isinstance(value, dict):
        return {k: shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [shorten(v, limit) for v in value[:8]] + ([f"...(+{len(value) - 8})"] if len(value) > 8 else [])
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


# -- the bad inputs both engines must answer the same way -----------------------------------------------------
def bad_requests(model: str, max_model_len: int) -> dict[str, tuple[str, Any, bytes | None]]:
    """name -> (path, json body, raw body)."""
    too_long = "hello " * (max_model_len + 50)
    return {
        "body_not_json": ("/v1/completions", None, b"{not json"),
        "no_model": ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, None),
        "unknown_model": ("/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}, None),
        "max_tokens_0": ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 0}, None),
        "max_tokens_negative": ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": -1}, None),
        "prompt_too_long": ("/v1/completions", {"model": model, "prompt": too_long, "max_tokens": 2}, None),
        # Token-id prompts: exact lengths.
        "prompt_ids_too_long": ("/v1/completions", {"model": model, "prompt": [5] * (max_model_len + 1),
                                                    "max_tokens": 2}, None),
        "prompt_plus_max_tokens_too_long": ("/v1/completions", {"model": model, "prompt": [5] * (max_model_len - 10),
                                                                "max_tokens": 100}, None),
        "n_2": ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2, "n": 2}, None),
        "chat_no_messages": ("/v1/chat/completions", {"model": model, "max_tokens": 2}, None),
        "chat_max_tokens_0": (
            "/v1/chat/completions", {"model": model, "messages": CHAT_MESSAGES, "max_tokens": 0}, None),
        "chat_unknown_model": (
            "/v1/chat/completions", {"model": "no-such-model", "messages": CHAT_MESSAGES, "max_tokens": 2}, None),
    }


# -- the report ---------------------------------------------------------------------------------------------
def _dump(title: str, value: Any) -> None:
    print(f"\n### {title}\n```json\n{json.dumps(value, indent=1, sort_keys=False)}\n```")


def capture(base_url: str, model: str, kv_endpoint: str | None, max_model_len: int) -> None:
    from .kvevents import KvEventCollector

    collector = KvEventCollector(kv_endpoint) if kv_endpoint else None
    time.sleep(0.5)  # let the SUB socket join before anything is published
    try:
        _capture(base_url, model, collector, max_model_len)
    finally:
        if collector:
            collector.close()


def _capture(base_url: str, model: str, collector, max_model_len: int) -> None:
    # Responses first (so histograms and counters have samples).
    comp_body = {"model": model, "prompt": LONG_PROMPT, "max_tokens": 5, "temperature": 0}
    t0 = time.monotonic()
    status, first = post_json(base_url, "/v1/completions", comp_body)
    dt = time.monotonic() - t0
    _dump(f"completion (non-stream), status {status}, {dt * 1000:.0f} ms", shorten(first))
    if collector:
        time.sleep(0.5)
        msgs = collector.snapshot()
        print(f"\n### KV event messages after the first ~{first.get('usage', {}).get('prompt_tokens')}-token prompt:"
              f" {len(msgs)} message(s)")
        for m in msgs:
            print(f"- frames={m.frames} topic={m.topic!r} seq={m.seq} (raw {m.seq_raw.hex()}) "
                  f"payload bytes={len(m.payload_raw)}")
            _dump("payload (shortened)", shorten(m.payload, 40))
            _dump("payload shape", shape(m.payload))
        collector.clear()
    status, again = post_json(base_url, "/v1/completions", comp_body)
    _dump(f"same completion again (prefix cache hit), status {status}", shorten(again))
    status, short = post_json(base_url, "/v1/completions", {"model": model, "prompt": SHORT_PROMPT, "max_tokens": 3})
    t0 = time.monotonic()
    for _ in range(5):
        post_json(base_url, "/v1/completions", {"model": model, "prompt": SHORT_PROMPT, "max_tokens": 3})
    print(f"\nshort prompt ({short.get('usage', {}).get('prompt_tokens')} tokens, 3 out): "
          f"{(time.monotonic() - t0) / 5 * 1000:.0f} ms per request")
    status, chat = post_json(base_url, "/v1/chat/completions",
                             {"model": model, "messages": CHAT_MESSAGES, "max_tokens": 5, "temperature": 0})
    _dump(f"chat (non-stream), status {status}", shorten(chat))
    status, headers, chunks = sse(base_url, "/v1/completions", {
        "model": model, "prompt": SHORT_PROMPT, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    print(f"\n### completion SSE, status {status}, content-type {headers.get('content-type')}, "
          f"{len(chunks)} data lines")
    for c in chunks:
        print(f"    data: {c}")
    status, headers, chunks = sse(base_url, "/v1/chat/completions", {
        "model": model, "messages": CHAT_MESSAGES, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    print(f"\n### chat SSE, status {status}, content-type {headers.get('content-type')}, {len(chunks)} data lines")
    for c in chunks:
        print(f"    data: {c}")
    status, headers, chunks = sse(base_url, "/v1/completions", {
        "model": model, "prompt": SHORT_PROMPT, "max_tokens": 2, "stream": True})
    print(f"\n### completion SSE without stream_options, {len(chunks)} data lines")
    for c in chunks:
        print(f"    data: {c}")

    print("\n## Errors")
    for name, (path, body, raw) in bad_requests(model, max_model_len).items():
        status, resp = post_json(base_url, path, body, raw)
        _dump(f"{name}: POST {path} -> {status}", shorten(resp, 300))

    if collector:
        collector.clear()
    status, pd = post_json(base_url, "/v1/completions", {
        "model": model, "prompt": LONG_PROMPT + " prefill leg", "max_tokens": 1, "stream": False,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                               "remote_block_ids": None, "remote_host": None, "remote_port": None}})
    _dump(f"prefill leg with kv_transfer_params.do_remote_decode=true -> {status}", shorten(pd))

    if collector:
        _capture_removals(base_url, model, collector, max_model_len)

    text = request(base_url, "GET", "/metrics")[2].decode()
    fams = metric_families(text)
    print("\n## Metric families (vllm:*)\n")
    print("| family | type | label keys | samples |\n|---|---|---|---|")
    for name, info in sorted(fams.items()):
        print(f"| `{name}` | {info['type']} | {', '.join(info['label_keys'])} | {', '.join(info['samples'])} |")
    print("\n### Histogram buckets")
    for name, info in sorted(fams.items()):
        if "buckets" in info:
            print(f"- `{name}`: {', '.join(info['buckets'])}")
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            print(f"\n### cache_config_info\n```\n{line}\n```")
    for fam_name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                     "vllm:prefix_cache_hits_total", "vllm:lora_requests_info"):
        print("\n```")
        for line in text.splitlines():
            if line.startswith((fam_name, f"# HELP {fam_name}", f"# TYPE {fam_name}")):
                print(line)
        print("```")
    for path in ("/v1/models", "/health", "/version"):
        status, _, data = request(base_url, "GET", path)
        print(f"\nGET {path} -> {status}: `{data.decode()[:400]}`")


def _capture_removals(base_url: str, model: str, collector, max_model_len: int) -> None:
    """Evictions (BlockRemoved) by filling a small cache, then AllBlocksCleared by /reset_prefix_cache."""
    collector.clear()
    for i in range(6):  # distinct ~1900-token prompts: 6 x 15 blocks > 64 blocks
        post_json(base_url, "/v1/completions", {"model": model, "prompt": [100 + i] + [7 + i] * (max_model_len - 150),
                                                "max_tokens": 1})
    time.sleep(0.5)
    msgs = collector.snapshot()
    kinds = [[e.get("type") if isinstance(e, dict) else e[0] for e in m.events] for m in msgs]
    print(f"\n### After 6 distinct ~1900-token prompts: {len(msgs)} messages, event types per message: {kinds}")
    for m in msgs:
        for e in m.events:
            if isinstance(e, dict) and e.get("type") == "BlockRemoved":
                _dump(f"BlockRemoved (message seq {m.seq}, {len(m.events)} events in it)", shorten(e, 40))
                break
        else:
            continue
        break
    collector.clear()
    status, _, body = request(base_url, "POST", "/reset_prefix_cache")
    time.sleep(0.5)
    print(f"\nPOST /reset_prefix_cache -> {status} {body[:200]!r}")
    for m in collector.snapshot():
        _dump(f"message seq {m.seq} after reset", shorten(m.payload, 40))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url")
    ap.add_argument("--kv", help="KV events endpoint, e.g. tcp://127.0.0.1:5557")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=None)
    args = ap.parse_args(argv)
    if args.base_url:
        capture(args.base_url, args.model, args.kv, args.max_model_len)
        return 0
    import tempfile
    from pathlib import Path

    from .server import VllmServer
    from .tinymodel import ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="kvshare-") as share:
        with VllmServer(ensure_tiny_model(), model_name=args.model, block_size=args.block_size,
                        max_model_len=args.max_model_len, shared_storage_path=Path(share)) as srv:
            print(f"started in {srv.startup_seconds:.1f} s; block size {srv.actual_block_size()}; log {srv.log_path}")
            capture(srv.base_url, args.model, srv.kv_events_endpoint, args.max_model_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())

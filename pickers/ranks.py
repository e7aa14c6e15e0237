"""Endpoint ids of data-parallel ranks: ``ip:port#rank`` (see ``pickers.types.Endpoint``).

The gateway routes to ``ip:port``; the rank reaches vLLM in the ``X-data-parallel-rank`` header, which vLLM's
OpenAI server reads (vllm/entrypoints/generate/base/serving.py ``_get_data_parallel_rank``) and its engine
client honours instead of its own balancing (vllm/v1/engine/core_client.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pickers.types import Endpoint

if TYPE_CHECKING:
    from pickers.datalayer.endpoints import EndpointTable

RANK_HEADER = "x-data-parallel-rank"


def split_endpoint_id(endpoint_id: str) -> tuple[str, int | None]:
    """``ip:port#rank`` -> (``ip:port``, rank); ``ip:port`` -> (``ip:port``, None)."""
    address, sep, rank = endpoint_id.partition("#")
    if not sep:
        return endpoint_id, None
    if not rank.isdigit():
        raise ValueError(f"bad endpoint id {endpoint_id!r}: the rank after '#' must be a number")
    return address, int(rank)


def endpoint_address(endpoint_id: str) -> str:
    return endpoint_id.partition("#")[0]


def destinations(endpoint_ids: list[str]) -> tuple[list[str], int | None]:
    """The gateway's fallback list (addresses, each once, in order) and the rank for the primary's pod.

    The rank header is one value, so it is the primary's; a fallback to another pod gets the same rank
    number there (every rank of a pod has the same shape; the gateway only falls back when the primary failed).
    """
    out: list[str] = []
    seen: set[str] = set()
    for e in endpoint_ids:
        a = endpoint_address(e)
        if a not in seen:
            seen.add(a)
            out.append(a)
    rank = split_endpoint_id(endpoint_ids[0])[1] if endpoint_ids else None
    return out, rank


def served_id(primary: str, served_address: str) -> str:
    """The endpoint id that took the request, from the address the gateway reports (same rank number)."""
    address, rank = split_endpoint_id(primary)
    if served_address == address or rank is None:
        return primary if served_address == address else served_address
    return f"{served_address}#{rank}"


def offset_port(zmq_endpoint: str | None, engine_index: int) -> str | None:
    """vLLM's KV-event endpoint of DP rank ``engine_index``: the port plus the index (tcp), ``_dp<i>`` appended
    (inproc); rank 0 and a tcp port of 0 unchanged (vllm/distributed/kv_events.py offset_endpoint_port)."""
    if not zmq_endpoint or engine_index == 0:
        return zmq_endpoint
    if "inproc" in zmq_endpoint:
        return f"{zmq_endpoint}_dp{engine_index}"
    base, sep, port = zmq_endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"KV events endpoint {zmq_endpoint!r} has no port to offset by the rank")
    return zmq_endpoint if int(port) == 0 else f"{base}:{int(port) + engine_index}"


def expand_ranks(ep: Endpoint, dp_size: int, start_rank: int = 0) -> list[Endpoint]:
    """Pod ``ep`` serving ``dp_size`` data-parallel ranks as one endpoint per rank. ``start_rank`` is the global
    rank of its first (vLLM ``--data-parallel-start-rank`` on a multi-node group's later nodes): the metrics
    label and KV-event port of local rank i are those of engine ``start_rank + i``."""
    if dp_size < 1 or start_rank < 0:
        raise ValueError(f"dp_size must be >= 1 and start_rank >= 0, got {dp_size}, {start_rank}")
    return [dataclasses.replace(ep, dp_rank=i, dp_engine=start_rank + i, dp_size=dp_size,
                                kv_events=offset_port(ep.kv_events, start_rank + i)) for i in range(dp_size)]


def fold_ranks(endpoints: list[Endpoint]) -> list[Endpoint]:
    """One endpoint per pod: the ranks of a pod folded into the pod (no rank; its KV events from every rank's
    publisher, comma-separated); order kept."""
    out: dict[str, Endpoint] = {}
    feeds: dict[str, list[str]] = {}
    for ep in endpoints:
        if ep.dp_rank is None:
            out[ep.address] = ep
            continue
        if ep.address not in out or ep.dp_rank == 0:
            out[ep.address] = dataclasses.replace(ep, dp_rank=None, dp_engine=None, dp_size=None)
        if ep.kv_events:
            feeds.setdefault(ep.address, []).append(ep.kv_events)
    for address, kv in feeds.items():  # every rank's KV events count for the pod (none says which rank)
        out[address] = dataclasses.replace(out[address], kv_events=",".join(kv))
    return list(out.values())


def learn_ranks(table: EndpointTable, url: str, engines: list[str]) -> int:
    """A pod's /metrics at ``url`` shows several ``engine`` labels (vLLM data-parallel ranks): each pod-level
    endpoint scraped there becomes one endpoint per rank (ranks added first, then the pod removed, so the
    scrape of that URL never stops). Returns how many pods were split."""
    try:
        idx = sorted(int(e) for e in engines)
    except ValueError:
        return 0
    if len(idx) < 2 or idx != list(range(idx[0], idx[0] + len(idx))):
        return 0  # not a contiguous run of engine indexes: leave the pod as it is
    split = 0
    for ep in [e for e in table.endpoints if e is not None and e.dp_rank is None and e.scrape_url == url]:
        for ranked in expand_ranks(ep, len(idx), idx[0]):
            table.add(ranked)
        table.remove(ep.id)
        split += 1
    return split


__all__ = ["RANK_HEADER", "destinations", "endpoint_address", "expand_ranks", "fold_ranks", "learn_ranks",
           "offset_port", "served_id", "split_endpoint_id"]

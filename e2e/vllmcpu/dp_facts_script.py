"""Run with vLLM's python: what vLLM's own code does with data-parallel ranks (printed as JSON).

- the rank header: ``GenerateBaseServing._get_data_parallel_rank`` on requests with and without the header;
- metric labels: the label names of vLLM's per-engine Prometheus series (PrometheusStatLogger's source);
- KV events: a ``KVEventBatch`` with ``data_parallel_rank`` encoded as vLLM's publisher encodes it (msgpack,
  base64 here), and ``ZmqEventPublisher.offset_endpoint_port`` for a few ranks;
- the internal balancing rule's source lines (``DPLBAsyncMPClient.get_core_engine_for_request``).
"""

from __future__ import annotations

import base64
import inspect
import json
import re


class _Req:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def main() -> int:
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.v1.engine.core_client import DPLBAsyncMPClient
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    rank = GenerateBaseServing._get_data_parallel_rank
    header = {"absent": rank(_Req({})), "two": rank(_Req({"X-data-parallel-rank": "2"})),
              "bad": rank(_Req({"X-data-parallel-rank": "x"}))}
    src = inspect.getsource(PrometheusStatLogger.__init__)
    labels = re.search(r"labelnames\s*=\s*\[([^\]]*)\]", src)
    batch = KVEventBatch(ts=1.5, events=[BlockStored(block_hashes=[11, 12], parent_block_hash=None,
                                                     token_ids=list(range(32)), block_size=16, lora_id=None,
                                                     medium="GPU", lora_name=None)], data_parallel_rank=3)
    import msgspec

    payload = msgspec.msgpack.Encoder().encode(batch)  # what ZmqEventPublisher sends as the third frame
    lb = inspect.getsource(DPLBAsyncMPClient.get_core_engine_for_request)
    facts = {
        "header": header,
        "header_name_in_source": "X-data-parallel-rank" in inspect.getsource(
            GenerateBaseServing._get_data_parallel_rank),
        "metric_labels": [s.strip().strip("\"'") for s in labels.group(1).split(",")] if labels else None,
        "payload_b64": base64.b64encode(payload).decode(),
        "offset": {str(r): ZmqEventPublisher.offset_endpoint_port("tcp://*:5557", r) for r in (0, 1, 3)},
        "offset_inproc": ZmqEventPublisher.offset_endpoint_port("inproc://ev", 2),
        "lb_rule": {
            "inflight_floor": "max(self.client_count * inflight, waiting + running)" in lb,
            "kv_penalty": "waiting * 6.0 * max(0.0, kv_cache_usage - 0.5)" in lb,
            "rotating_start": "self.eng_start_index = (self.eng_start_index + 1) % num_engines" in lb,
            "header_first": "request.data_parallel_rank" in lb,
        },
    }
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

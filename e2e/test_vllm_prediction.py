"""The predictor's online correction against a real vLLM CPU pod, whose speed the roofline does not know.

The pod is declared as what the cost model knows (llama-3.1-8b on an H100); it is really a tiny random model
on a shared CPU. The director predicts each request's TTFT, the test measures it (time to the first streamed
chunk, with the picker's own clock) and reports it through ``on_first_token``. Within 50 requests the corrected
prediction's error (MAPE over the last 20) must be well under the uncorrected cost model's: the behaviour that
can break. The figure itself is printed; issue 10's goal (under 25 %) is a measurement reported with the machine's
load, not a pass/fail bound, since identical prompts vary ~2x in TTFT on a shared 2-core machine.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import numpy as np
import pytest

from pickers.clock import MonotonicClock
from pickers.config import build_scheduler
from pickers.types import Endpoint, InferenceRequest, Usage

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _stream_first_chunk(base_url: str, body: dict, clock: MonotonicClock) -> tuple[float, float, int]:
    """(time the first data chunk arrived, time of the end, completion tokens) of a streamed completion."""
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        first = -1.0
        tokens = 0
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            doc = json.loads(line[5:])
            if doc.get("choices") and first < 0:
                first = clock.now()
            if doc.get("usage"):
                tokens = int(doc["usage"].get("completion_tokens") or 0)
        return first, clock.now(), tokens
    finally:
        conn.close()


def test_online_correction_cuts_the_ttft_error_against_real_vllm_within_50_requests(vllm_pair):
    pod = vllm_pair.a
    clock = MonotonicClock()
    sched = build_scheduler({"profile": "least-inflight", "admission": ["none"]},
                            [Endpoint(pod.address, model_profile="llama-3.1-8b", accelerator="H100")],
                            clock, network=False)
    rng = np.random.default_rng(7)
    errors, raw_errors = [], []
    for i in range(50):
        vllm_pair.clear_shared_storage()
        n = int(rng.integers(64, 1500))
        ids = [int(x) for x in rng.integers(10, 500, n)]
        ids[0] = 600 + i  # a fresh first token: no prefix cache hit on the pod
        req = InferenceRequest(request_id=f"c{i}", model=vllm_pair.model_name, prompt_token_ids=ids, max_tokens=4,
                               stream=True)
        d = sched.decide(req)
        exp = d.state.expected
        first, end, tokens = _stream_first_chunk(pod.base_url, {
            "model": vllm_pair.model_name, "prompt": ids, "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}, clock)
        observed = first - d.state.arrival
        print(f"{i} n={n} obs={observed * 1e3:.1f} raw={exp.ttft_raw_s * 1e3:.1f} pred={exp.ttft_s * 1e3:.1f}")
        errors.append(abs(exp.ttft_s - observed) / observed)
        raw_errors.append(abs(exp.ttft_raw_s - observed) / observed)
        sched.on_first_token(d, first)
        sched.on_finished(d, Usage(n, tokens), end)
    for j in range(0, 50, 5):
        print(j, [round(e, 2) for e in errors[j:j + 5]])
    late = float(np.mean(errors[-20:]))
    raw_late = float(np.mean(raw_errors[-20:]))
    print(f"TTFT MAPE: raw cost model {np.mean(raw_errors):.1%} (last 20: {raw_late:.1%}), corrected (last 20 of "
          f"50) {late:.1%}, first 4 {np.mean(errors[:4]):.1%}")
    print("correction:", sched.dl.predictor.correction.coefficients(("llama-3.1-8b", "H100", "both")))
    # within 25 % (issue 10's goal), or at least 40 % less error than the cost model alone. Measured: 11.9 % vs raw
    # 29.7 % on a quiet machine (CI run, load ~1), 33 % vs 82-90 % with six other jobs running; with the robust
    # fit (pickers/correction.py) 5.1 % and 7.7 % vs raw 87-90 % (two runs, load 0-3.4). Fast outliers (a
    # stall that emptied the queue) used to drag main's least-squares fit: 37.7 % vs the bound 32 % once.
    assert late < max(0.25, 0.6 * raw_late)

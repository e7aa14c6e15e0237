"""The full fuzz run, coverage-guided (atheris / libFuzzer), for counts hypothesis is too slow to reach here:

    .venv/bin/python tests/fuzz/atheris_fuzz.py -runs=110000          # parser, validation and stream together

Each input is split by a FuzzedDataProvider into a target choice and its bytes: (0) raw body bytes through
``parse_client_body``; (1) an OpenAI-shaped document built from the bytes, engine-internal keys escaped now and
then; (2) a stream of ext_proc messages in any order, body and SSE chunks split anywhere, closed at any point,
through ``ExtProcStream`` over a real director. The properties are those of test_fuzz_parse / test_fuzz_stream
(the same check functions). Prints the running count every 10,000 inputs; libFuzzer's "Done N runs" ends it.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    import orjson

    from extproc import observe, parse, stream  # noqa: F401  (instrumented for coverage)
    from tests.fuzz import conftest  # noqa: F401  (registers the hypothesis profile the modules use)
    from tests.fuzz.test_fuzz_parse import PATHS, check
    from tests.fuzz.test_fuzz_stream import _LOOP, GOOD, SSE, drive
    from tests.fuzz.test_fuzz_stream import COUNT as STREAM_COUNT

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402

from e2e.support.extproc_fakes import body, headers  # noqa: E402

RUNS = {"inputs": 0}
KEYS = ["model", "prompt", "messages", "input", "stream", "max_tokens", "kv_transfer_params", "vllm_xargs"]


def _doc(fdp: atheris.FuzzedDataProvider) -> bytes:
    doc: dict[str, object] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = KEYS[fdp.ConsumeIntInRange(0, len(KEYS) - 1)]
        kind = fdp.ConsumeIntInRange(0, 5)
        doc[key] = [fdp.ConsumeUnicodeNoSurrogates(8), fdp.ConsumeIntInRange(-(2**63), 2**64 - 1), fdp.ConsumeBool(),
                    [fdp.ConsumeInt(5) for _ in range(fdp.ConsumeIntInRange(0, 4))],
                    [{"role": "user", "content": fdp.ConsumeUnicodeNoSurrogates(6)}], None][kind]
    raw = orjson.dumps(doc)
    if fdp.ConsumeBool():
        raw = raw.replace(b'"kv_transfer_params"', b'"kv_transfer_param\\u0073"')
    return raw


def _messages(fdp: atheris.FuzzedDataProvider) -> list[pb.ProcessingRequest]:
    msgs = []
    for _ in range(fdp.ConsumeIntInRange(0, 10)):
        k = fdp.ConsumeIntInRange(0, 5)
        if k == 0:
            msgs.append(headers({":method": "POST", ":path": PATHS[fdp.ConsumeIntInRange(0, 3)]},
                                end_of_stream=fdp.ConsumeBool()))
        elif k == 1:
            src = GOOD[fdp.ConsumeIntInRange(0, len(GOOD) - 1)] if fdp.ConsumeBool() else fdp.ConsumeBytes(40)
            a = fdp.ConsumeIntInRange(0, len(src))
            msgs.append(body(src[:a] if fdp.ConsumeBool() else src[a:], fdp.ConsumeBool()))
        elif k == 2:
            msgs.append(headers({":status": ["200", "500", "x", ""][fdp.ConsumeIntInRange(0, 3)],
                                 "content-type": "text/event-stream"}, end_of_stream=fdp.ConsumeBool(),
                                response=True, served=[None, "10.0.0.2:8000"][fdp.ConsumeIntInRange(0, 1)]))
        elif k == 3:
            chunk = SSE[fdp.ConsumeIntInRange(0, len(SSE) - 1)] + fdp.ConsumeBytes(8)
            msgs.append(body(chunk, fdp.ConsumeBool(), response=True))
        elif k == 4:
            msgs.append(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
        else:
            msgs.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    return msgs


def one_input(data: bytes) -> None:
    RUNS["inputs"] += 1
    if RUNS["inputs"] % 10_000 == 0:
        _report()
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 2)
    if target == 0:
        check(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400)), PATHS[fdp.ConsumeIntInRange(0, 3)])
    elif target == 1:
        check(_doc(fdp), PATHS[fdp.ConsumeIntInRange(0, 3)])
    else:
        _LOOP.run_until_complete(drive(_messages(fdp), fdp.ConsumeBool()))


def _report() -> None:
    print(f"atheris fuzz: {RUNS['inputs']} inputs ({STREAM_COUNT['streams']} ext_proc streams, "
          f"{STREAM_COUNT['messages']} messages); no property failed", flush=True)


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    atexit.register(_report)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

"""Start the test pair by hand and keep it up (for exploring, benchmarks and the simulator's author):

    .venv/bin/python -m e2e.vllmcpu.pair [--block-size N] [--single]

Prints the addresses, KV endpoints, block size and start-up seconds as JSON, then waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from pathlib import Path

from .server import VllmServer, start_all
from .tinymodel import ensure_tiny_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--num-blocks", type=int, default=64)
    ap.add_argument("--single", action="store_true", help="one server instead of two")
    ap.add_argument("--no-connector", action="store_true", help="no ExampleConnector")
    ap.add_argument("--exit", action="store_true", help="stop as soon as both are up (timing)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    model = ensure_tiny_model()
    made = time.monotonic() - t0
    share = Path(tempfile.mkdtemp(prefix="kvswitch-kvshare-"))
    servers = [VllmServer(model, block_size=args.block_size, num_blocks=args.num_blocks or None,
                          shared_storage_path=None if args.no_connector else share)
               for _ in range(1 if args.single else 2)]
    # Block SIGINT/SIGTERM so sigwait() receives them (an unblocked SIGINT never wakes sigwait).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    t1 = time.monotonic()
    start_all(servers)
    info = {
        "model_dir": str(model), "model_seconds": round(made, 2), "shared_storage_path": str(share),
        "all_up_seconds": round(time.monotonic() - t1, 1),
        "servers": [{"base_url": s.base_url, "kv_events": s.kv_events_endpoint, "log": str(s.log_path),
                     "startup_seconds": round(s.startup_seconds or 0, 1), "block_size": s.actual_block_size()}
                    for s in servers],
    }
    print(json.dumps(info, indent=1), flush=True)
    try:
        if not args.exit:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

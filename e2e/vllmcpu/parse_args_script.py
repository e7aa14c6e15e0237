"""Run with vLLM's python: parse argument lists with vLLM's own ``vllm serve`` parser.

stdin: a JSON list of argument lists (what follows ``vllm serve``). stdout: a JSON list with, per list,
``{"ok": true, "parsed": {...}}`` or ``{"ok": false, "error": "..."}``. Besides argparse itself (unknown
flags, bad choices such as an all-to-all backend, bad types), the JSON-valued configs are checked against
vLLM's config classes: ``--speculative-config``'s method against ``SpeculativeMethod``, ``--kv-events-config``
and ``--kv-transfer-config`` by building ``KVEventsConfig`` / ``KVTransferConfig``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import typing


def _literal_values(tp: object) -> set[str]:
    out: set[str] = set()
    for a in typing.get_args(tp):
        if isinstance(a, str):
            out.add(a)
        else:
            out |= _literal_values(a)
    return out


def main() -> int:
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.config.speculative import SpeculativeMethod
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    methods = _literal_values(SpeculativeMethod)
    cases = json.load(sys.stdin)
    results = []
    for args in cases:
        parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args(args)
        except SystemExit:
            results.append({"ok": False, "error": err.getvalue().strip().splitlines()[-1:] or ["argparse exit"]})
            continue
        problems = []
        spec = getattr(ns, "speculative_config", None)
        if spec is not None and spec.get("method") not in methods:
            problems.append(f"speculative method {spec.get('method')!r} is not one of vLLM's")
        for name, cls in (("kv_events_config", KVEventsConfig), ("kv_transfer_config", KVTransferConfig)):
            val = getattr(ns, name, None)
            if isinstance(val, dict):
                try:
                    cls(**val)
                except Exception as exc:  # pydantic ValidationError or TypeError
                    problems.append(f"{name}: {exc.__class__.__name__}: {exc}")
        if problems:
            results.append({"ok": False, "error": problems})
            continue
        keys = ("model", "data_parallel_size", "data_parallel_size_local", "data_parallel_start_rank",
                "data_parallel_address", "data_parallel_rpc_port", "enable_expert_parallel", "all2all_backend",
                "enable_eplb", "tensor_parallel_size", "headless", "block_size", "port")
        parsed = {k: getattr(ns, k, None) for k in keys}
        parsed["speculative_config"] = spec
        results.append({"ok": True, "parsed": parsed})
    json.dump(results, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

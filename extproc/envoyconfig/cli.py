"""``kvswitch envoy-config``: write an Envoy bootstrap that sends every request through the picker."""

from __future__ import annotations

import argparse
import sys

from extproc.envoyconfig.builder import EnvoyConfigOptions, render


def parse_args(argv: list[str]) -> tuple[EnvoyConfigOptions, str | None, str]:
    p = argparse.ArgumentParser(prog="kvswitch envoy-config", description=__doc__)
    p.add_argument("--listen-port", type=int, default=8081)
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--picker", action="append", metavar="HOST:PORT",
                   help="a kvswitch gRPC address (repeat for replicas; default 127.0.0.1:9002)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fail-open", dest="fail_open", action="store_true",
                      help="let requests through (round robin) when the picker is down")
    mode.add_argument("--fail-closed", dest="fail_open", action="store_false",
                      help="fail requests when the picker is down (default)")
    p.add_argument("--lb", choices=["override-host", "original-dst"], default="override-host")
    p.add_argument("--endpoint", action="append", default=[], metavar="IP:PORT",
                   help="a pool pod (repeatable; required with --lb override-host)")
    p.add_argument("--response-body", choices=["access-log", "observe", "skip", "detach"], default="access-log",
                   help="what of the response reaches the picker (pair with kvswitch serve --response-body): "
                        "access-log (default): nothing on the ext_proc stream, the outcome (first byte, usage, "
                        "status) through Envoy's gRPC access log; observe: every chunk; skip: headers and end; "
                        "detach: nothing")
    p.add_argument("--access-log-flush-ms", type=float, default=EnvoyConfigOptions.access_log_flush_ms, metavar="MS",
                   help="with --response-body access-log: Envoy batches the access-log entries it sends to the "
                        f"picker, one message per 16 KiB or MS milliseconds (default "
                        f"{EnvoyConfigOptions.access_log_flush_ms:g}; 0: each entry as its request ends)")
    p.add_argument("--picker-protocol", choices=["ext-authz", "ext-proc"],
                   help="how Envoy asks the picker: ext-authz (the default, unless --picker-tls or a response body "
                        "mode other than access-log/detach is given): Envoy's ext_authz filter over HTTP/1.1 to the "
                        "picker's decide port, one request per request, about a tenth of ext-proc's picker CPU; "
                        "ext-proc: a gRPC ext_proc stream per request (the Gateway API Inference Extension's "
                        "protocol, every response mode, TLS)")
    p.add_argument("--decide-timeout", type=float, default=EnvoyConfigOptions.decide_timeout_s, metavar="S",
                   help="ext-authz: seconds Envoy waits for the picker's answer, which flow control holds past the "
                        f"knee (default {EnvoyConfigOptions.decide_timeout_s:g}, below Envoy's 300 s stream idle "
                        "timeout; give kvswitch serve the same in server.decide_timeout_s)")
    p.add_argument("--picker-decide", action="append", metavar="HOST:PORT",
                   help="a picker's ext_authz address, one per --picker in the same order (default: each picker's "
                        "host with its port + 1, kvswitch serve's default server.decide_port)")
    p.add_argument("--picker-tls", action="store_true",
                   help="connect to the picker over TLS (kvswitch serve --tls-cert/--tls-key or --tls-self-signed)")
    p.add_argument("--picker-tls-ca", metavar="PEM", help="verify the picker's certificate against this CA file "
                   "(implies --picker-tls; without it the connection is encrypted but not verified)")
    p.add_argument("--picker-tls-sni", default="", metavar="NAME", help="server name sent to the picker")
    p.add_argument("--max-body-bytes", type=int, metavar="N",
                   help="answer a request whose content-length is past N with a 400 context_length_exceeded from "
                        "Envoy, before the picker sees it (kvswitch serve's server.context_cap_bytes; default: none)")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--out", help="write here instead of stdout")
    a = p.parse_args(argv)
    pickers = a.picker or ["127.0.0.1:9002"]
    tls = a.picker_tls or bool(a.picker_tls_ca)
    protocol = a.picker_protocol or ("ext-authz" if not tls and a.response_body in ("access-log", "detach")
                                     else "ext-proc")
    opts = EnvoyConfigOptions(listen_port=a.listen_port, listen_host=a.listen_host, picker=pickers[0],
                              pickers=pickers[1:],
                              fail_open=a.fail_open, lb=a.lb, admin_port=a.admin_port,
                              response_body=a.response_body, access_log_flush_ms=a.access_log_flush_ms,
                              picker_tls=tls, picker_tls_ca=a.picker_tls_ca,
                              picker_protocol=protocol, picker_decide=a.picker_decide or [],
                              decide_timeout_s=a.decide_timeout,
                              picker_tls_sni=a.picker_tls_sni,
                              endpoints=[e.split(",")[0] for e in a.endpoint],
                              max_body_bytes=a.max_body_bytes)
    return opts, a.out, a.format


def main(argv: list[str]) -> int:
    opts, out, fmt = parse_args(argv)
    try:
        text = render(opts, fmt)
    except ValueError as exc:
        print(f"kvswitch envoy-config: {exc}", file=sys.stderr)
        return 2
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0

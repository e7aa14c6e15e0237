"""``python -m extproc.healthcheck [HOST:PORT] [SERVICE]``: exit 0 when the picker's gRPC health says SERVING.

The container image's HEALTHCHECK (Docker, podman with --format docker). In Kubernetes the kubelet's own gRPC
probes do this against ``server.health_port`` (gateway-api/base/picker.yaml); this module is for runtimes without
them. Default: 127.0.0.1:9003 (the base configuration's plaintext health port), service ``readiness``.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout_s: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return False
    ok = r.status == health_pb2.HealthCheckResponse.SERVING
    if not ok:
        print(f"{address} {service or '(overall)'}: {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}",
              file=sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    address = args[0] if args else "127.0.0.1:9003"
    service = args[1] if len(args) > 1 else "readiness"
    return 0 if check(address, service) else 1


if __name__ == "__main__":
    raise SystemExit(main())

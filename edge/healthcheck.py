"""A container / systemd health probe: exit 0 when the server answers SERVING.

    python -m headrace.edge.healthcheck                       # 127.0.0.1:50051, whole server
    python -m headrace.edge.healthcheck --service sentiment   # one model
    python -m headrace.edge.healthcheck --target 10.0.0.5:50051 --timeout 2

Speaks the standard grpc.health.v1 protocol (as grpc_health_probe does) with
grpcio alone, so it needs nothing beyond what the server already installs.
Exit codes: 0 SERVING, 1 anything else (NOT_SERVING, unknown service,
unreachable, timeout); the reason goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, status name or error) for `service` on `target`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,  # ride out a server that is still binding its port
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headrace.edge.healthcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--service", default="", help="model name; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for a reply")
    args = parser.parse_args(argv)
    ok, status = check(args.target, args.service, args.timeout)
    if not ok:
        print(f"{args.target} {args.service or '(server)'}: {status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

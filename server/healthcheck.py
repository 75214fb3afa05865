"""Container health probe: exit 0 only when grpc.health.v1.Health/Check answers SERVING.

`python -m server.healthcheck --addr 127.0.0.1:50051` is the Dockerfile HEALTHCHECK; Kubernetes
probes can run the same command. It imports grpc and the client, never torch, so each probe starts fast.
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.cli_flags import seconds
from clients.client import Tls

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(addr: str, service: str = "", timeout: float = 3.0,
          credentials: grpc.ChannelCredentials | None = None) -> tuple[bool, str]:
    """Ask `addr` for the status of `service` ("" is the whole server): (serving?, one-word reason)."""
    # A probe of a local port must never go through an HTTP proxy inherited from the environment.
    options = [("grpc.enable_http_proxy", 0)]
    channel = grpc.secure_channel(addr, credentials, options) if credentials else grpc.insecure_channel(addr, options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:  # UNAVAILABLE (nothing listening), DEADLINE_EXCEEDED, NOT_FOUND, ...
            return False, f"{err.code().name}: {err.details()}"
    return response.status == SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck",
                                     description="Exit 0 if the gRPC health service says SERVING, else 1.")
    parser.add_argument("--addr", "--target", dest="addr", default="127.0.0.1:50051",
                        help="server address host:port (--target, as in the loraplex CLI)")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--timeout", type=seconds, default=3.0, help="deadline of the Check call in seconds")
    parser.add_argument("--tls-ca", default=None, help="PEM CA of a TLS server (health needs no token, but TLS "
                                                       "needs the CA)")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM client key (mutual TLS)")
    args = parser.parse_args(argv)
    try:
        credentials = Tls(args.tls_ca, args.tls_cert, args.tls_key).credentials() \
            if args.tls_ca or args.tls_cert or args.tls_key else None
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    serving, reason = check(args.addr, args.service, args.timeout, credentials)
    print(f"{args.addr} service {args.service!r}: {reason}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

"""The real server in a child process (`python -m server`, what `loraplex serve` runs), for the benchmarks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Started with `flags` (serve's command line, without ports: they are picked here); waits for SERVING. `cwd`:
    the checkout whose server runs (default: this one)."""

    def __init__(self, flags: list, module: str = "server", env: dict | None = None, timeout: float = 600,
                 cwd: Path | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", module, *map(str, flags), "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port)]
        self.proc = subprocess.Popen(command, cwd=cwd or ROOT, env=dict(os.environ, **(env or {})))
        try:
            self._wait_serving(timeout)
        except BaseException:
            self.proc.kill()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_serving(self, timeout: float) -> None:
        from grpc_health.v1 import health_pb2

        from clients.client import Client
        deadline = time.monotonic() + timeout
        with Client(self.target, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server process exited with status {self.proc.returncode}")
                try:
                    if client.health() == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError("the server did not report SERVING in time")

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory so far (VmHWM; Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found in /proc/<pid>/status")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

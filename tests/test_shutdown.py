"""Start-up and shutdown through the real server: health until the model is warm, drain on SIGTERM, the grace
period, a second signal, and adapter loads and unloads a shutdown meets."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.client import Client
from protos.loraplex.v1 import inference_pb2 as pb
from server import app as server_app
from server.background import BackgroundServer
from server.config import ServerConfig
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, slow_decode, start_server, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "v1", 21, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    make_peft_adapter(model_dirs["llama"], root / "v2", 22, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    return root


def test_health_not_serving_until_model_is_warm(model_dirs, monkeypatch):
    gate = threading.Event()
    real = server_app.build_serving

    def gated(*args):
        gate.wait(60)
        return real(*args)
    monkeypatch.setattr(server_app, "build_serving", gated)
    config = server_app.ServerConfig(model=str(model_dirs["llama"]), port=0, metrics_port=0, log_level="WARNING")
    background = BackgroundServer(config)
    threading.Thread(target=background.start, daemon=True).start()
    assert wait_for(lambda: background.ports is not None)  # bound, model still loading
    with Client(f"127.0.0.1:{background.ports.grpc}", timeout=5) as client:
        assert client.health() == NOT_SERVING and client.health("loraplex.v1.Inference") == NOT_SERVING
        for adapter_id in ("", "v1"):  # an adapter request reached the registry, not built yet: INTERNAL
            with pytest.raises(grpc.RpcError) as info:
                client.generate("hi", adapter_id)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        # every Generate call ends in one of request_success/request_failure, refused while loading too
        assert scrape(background).get('loraplex_request_failure_total{code="UNAVAILABLE"}') == 2
        gate.set()
        assert wait_for(lambda: client.health() == SERVING, timeout=60)
        assert len(client.generate("hi", max_new_tokens=2).token_ids) == 2
    background.stop()


def _server_process(model_dir, *flags) -> tuple[subprocess.Popen, int]:
    """`python -m server` in its own process (signals reach it), and its gRPC port once bound."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(model_dir), "--port", "0", "--metrics-port", "0",
         "--threads", "1", *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in proc.stdout:
        match = re.search(r"grpc listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise AssertionError("server never reported its port")


def test_a_stop_while_the_model_loads_never_reports_serving(model_dirs, monkeypatch, caplog):
    gate = threading.Event()
    real = server_app.build_serving
    monkeypatch.setattr(server_app, "build_serving", lambda *args: (gate.wait(60), real(*args))[1])
    background = BackgroundServer(ServerConfig(model=str(model_dirs["llama"]), port=0, metrics_port=0,
                                                          threads=1, log_level="WARNING"))
    def start():
        with pytest.raises(RuntimeError, match="server did not start"):  # stopped before it was ready
            background.start(timeout=60)
    threading.Thread(target=start, daemon=True).start()
    assert wait_for(lambda: background.ports is not None and background._stop is not None)
    stopping = threading.Thread(target=background.stop)
    stopping.start()  # the stop arrives while the model loads
    seen = set()
    with caplog.at_level("INFO", logger="loraplex.app"), \
            Client(f"127.0.0.1:{background.ports.grpc}", timeout=5) as client:
        seen.add(_health(client))
        gate.set()
        while stopping.is_alive():
            seen.add(_health(client))
            time.sleep(0.005)
    assert SERVING not in seen and NOT_SERVING in seen, seen
    assert "stopped" in caplog.text and "ready" not in caplog.text  # never announced, not even for a moment


def test_a_sigterm_as_soon_as_the_port_is_announced_is_a_clean_stop(model_dirs):
    """The signal handlers are installed before the port is announced (a SIGTERM in between killed the process
    with the default action, exit -15); a second one while the model loads exits at once. The two processes start
    together (each spends seconds importing torch and transformers), each signalled as its port is announced."""
    def signalled(signals: int) -> tuple[int, str]:
        proc, _ = _server_process(model_dirs["llama"])
        try:
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.05)
            return proc.wait(timeout=60), proc.stdout.read()
        finally:
            proc.kill()
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(signalled, (1, 2)))
    for (code, log), expected in zip(outcomes, (0, 1)):
        assert code == expected, log
        assert "ready" not in log and ("stopped" in log if code == 0 else "while the model loads" in log), log


def test_sigterm_drains_then_exits_zero(model_dirs):
    proc, port = _server_process(model_dirs["llama"], "--grace-period", "20")
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            assert wait_for(lambda: _health(client) == SERVING, timeout=60)
            stream = client.generate_stream([5, 6], max_new_tokens=150, ignore_eos=True)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: _health(client) != SERVING, timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                client.generate("hi", max_new_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            messages = [first, *stream]  # the in-flight request finishes within the grace period
            assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(m.token_ids) for m in messages) == 150
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert "stopped" in log and "Traceback" not in log and "Loading weights" not in log, log  # no tqdm bars
        # the process is the server's: start-up's objects are kept out of the collector's full collections
        frozen = re.search(r"garbage collector: (\d+) objects alive at start frozen out of its full collections", log)
        assert frozen and int(frozen.group(1)) > 100_000, log
        assert "leaked" not in log, log  # unfrozen before the exit: nanobind (triton) counts uncollected objects
    finally:
        proc.kill()


def test_requests_left_when_the_grace_runs_out_hear_why(model_dirs, monkeypatch, caplog):
    """A request still waiting when the drain starts ends at once with UNAVAILABLE (it can start elsewhere now), a
    stream still running when the grace period is over with UNAVAILABLE saying so; the transport cuts neither
    (grpc would log a traceback for each)."""
    server = start_server(model_dirs["llama"], None, grace_period=0.0, max_batch_size=1)
    slow_decode(server, monkeypatch)
    outcomes = {}

    def run(name, call):
        try:
            outcomes[name] = list(call())
        except grpc.RpcError as exc:
            outcomes[name] = (exc.code(), exc.details())
    with Client(server.target, timeout=30) as client:
        running = client.generate_stream([5, 6], max_new_tokens=400, ignore_eos=True)
        next(running)
        waiting = threading.Thread(target=run, args=("waiting", lambda: [client.generate([7], max_new_tokens=4)]))
        waiting.start()
        assert wait_for(lambda: scrape(server)["loraplex_num_requests_waiting"] == 1)
        with caplog.at_level("ERROR"):
            server.stop()
            run("running", lambda: running)
            waiting.join(timeout=30)
    for name, says in (("running", "--grace-period 0s ran out"), ("waiting", "this request had not started")):
        code, details = outcomes[name]
        assert code == grpc.StatusCode.UNAVAILABLE, (name, outcomes[name])
        assert says in details and "retry on another replica" in details, details
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("grace, read_seconds", [(10.0, 1.0), (0.0, 3.0)])
def test_a_load_running_at_shutdown_is_told_how_it_ended(model_dirs, adapter_root, monkeypatch, caplog, grace,
                                                         read_seconds):
    """A LoadAdapter running when the server stops either finishes within the grace (and is told so, and logged)
    or is cut and told UNAVAILABLE, and then the restart does not load it either (it was recorded in the state
    file though its client heard it failed)."""
    server = start_server(model_dirs["llama"], adapter_root, grace_period=grace)
    registry = server.serving.registry
    load = registry.load
    monkeypatch.setattr(registry, "load", lambda *args: (time.sleep(read_seconds), load(*args))[1])  # a big read
    outcome = {}

    def run():
        with Client(server.target, timeout=30) as client:
            try:
                outcome["info"] = client.load_adapter("v2")
            except grpc.RpcError as exc:
                outcome["error"] = (exc.code(), exc.details())
    with caplog.at_level("INFO", logger="loraplex.servicers"):
        loading = threading.Thread(target=run)
        loading.start()
        assert wait_for(lambda: server.serving.registry_changes.count == 1)
        started = time.monotonic()
        server.stop()
        loading.join(timeout=30)
    time.sleep(max(0.0, read_seconds - (time.monotonic() - started)) + 0.5)  # the cut load's thread is done
    recorded = "v2" in Path(server.config.state_file).read_text() if Path(server.config.state_file).exists() else False
    if grace:
        assert outcome.get("info") is not None and outcome["info"].adapter_id == "v2", outcome
        assert time.monotonic() - started < 8  # waited for the load, not for the whole grace
        assert "LoadAdapter 'v2': version 1, loaded, not pinned" in caplog.text and recorded
    else:
        assert outcome.get("error", (None,))[0] == grpc.StatusCode.UNAVAILABLE, outcome
        assert not recorded


def test_a_draining_unload_at_shutdown_ends_as_it_was_recorded(model_dirs, adapter_root, monkeypatch):
    """The unload is done (and recorded) before it waits for the requests on the adapter: a shutdown lets that
    wait end with them, successfully, instead of telling the client UNAVAILABLE."""
    server = start_server(model_dirs["llama"], adapter_root, grace_period=30.0)
    slow_decode(server, monkeypatch)  # 300 steps take >= 1.5 s: the stream runs through the shutdown's start
    outcome = {}
    with Client(server.target, timeout=60) as client:
        client.load_adapter("v1")
        stream = client.generate_stream([5, 6], "v1", max_new_tokens=300, ignore_eos=True)
        next(stream)

        def unload():
            with Client(server.target, timeout=60) as admin:
                try:
                    outcome["unload"] = admin.unload_adapter("v1", drain=True).drained_requests
                except grpc.RpcError as exc:
                    outcome["unload"] = (exc.code(), exc.details())
        unloading = threading.Thread(target=unload)
        unloading.start()
        assert wait_for(lambda: "v1" not in Path(server.config.state_file).read_text())
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        assert sum(len(m.token_ids) for m in stream) == 299  # the running request finished within the grace
        unloading.join(timeout=30)
        stopping.join(timeout=60)
    assert outcome["unload"] == 1, outcome


def test_a_second_sigterm_ends_the_requests_without_waiting_for_the_grace(model_dirs):
    proc, port = _server_process(model_dirs["llama"], "--grace-period", "120", "--max-batch-size", "16")
    try:
        outcomes = []

        def run(stream):
            try:
                outcomes.append(sum(len(m.token_ids) for m in stream))
            except grpc.RpcError as exc:
                outcomes.append((exc.code(), exc.details()))
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            assert wait_for(lambda: _health(client) == SERVING, timeout=60)
            streams = [client.generate_stream([5 + i, 6], max_new_tokens=480, ignore_eos=True) for i in range(16)]
            for stream in streams:
                next(stream)
            threads = [threading.Thread(target=run, args=(s,)) for s in streams]
            for t in threads:
                t.start()
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: _health(client) != SERVING, timeout=10)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0 and time.monotonic() - started < 20  # not the 120 s grace
            for t in threads:
                t.join(timeout=10)
        cut = [o for o in outcomes if isinstance(o, tuple)]
        assert cut and all(code == grpc.StatusCode.UNAVAILABLE and "(a second signal)" in details
                           for code, details in cut), outcomes
        assert "second signal" in proc.stdout.read()
    finally:
        proc.kill()


def _health(client) -> int:
    try:
        return client.health()
    except grpc.RpcError:
        return -1


def test_open_health_watch_and_reflection_streams_do_not_hold_the_exit(model_dirs):
    """A load balancer keeps a health Watch open, a tool a reflection stream: neither ends by itself, and an idle
    server waited the whole --grace-period for them. Now it exits once no Inference/Adapters call runs; the Watch
    hears NOT_SERVING first, and a stream in flight still gets all its tokens."""
    import queue

    from grpc_health.v1 import health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    proc, port = _server_process(model_dirs["llama"], "--grace-period", "60")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            assert wait_for(lambda: _health(client) == SERVING, timeout=60)
            seen = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            watching = threading.Thread(target=lambda: seen.extend(_statuses(watch)), daemon=True)
            watching.start()
            asks = queue.Queue()
            asks.put(reflection_pb2.ServerReflectionRequest(list_services=""))
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter(asks.get, None))
            assert next(replies).list_services_response.service  # open, and left open
            assert wait_for(lambda: seen == [SERVING])
            stream = client.generate_stream([5, 6], max_new_tokens=40, ignore_eos=True)
            first = next(stream)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            messages = [first, *stream]
            assert sum(len(m.token_ids) for m in messages) == 40
            assert proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 15  # not the 60 s grace period
        watching.join(timeout=10)  # the Watch heard NOT_SERVING, then ended (OK): not cut, not left to the exit
        assert not watching.is_alive() and seen == [SERVING, NOT_SERVING], seen
        asks.put(None)
        log = proc.stdout.read()  # the cut streams are INFO lines, not grpc's ERROR + traceback (alerts fire on those)
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        channel.close()
        proc.kill()


def _statuses(watch):
    try:
        for reply in watch:
            yield reply.status
    except grpc.RpcError as err:
        yield err.code()

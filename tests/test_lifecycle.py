"""Cancellation, deadlines, health, drain on SIGTERM, reflection, metrics, hot-swap and adapter residency."""
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from server import app as server_app
from server.config import ServerConfig
from clients.client import AsyncClient, Client, build_request
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, start_server, status_of, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "v1", 21, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    make_peft_adapter(model_dirs["llama"], root / "v2", 22, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    make_peft_adapter(model_dirs["llama"], root / "small", 23, r=2, lora_alpha=4, target_modules=["q_proj"])
    shutil.copytree(root / "v1", root / "swap")
    return root


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    s = start_server(model_dirs["llama"], adapter_root)
    yield s
    s.stop()


def test_cancelled_stream_frees_its_row(server):
    with Client(server.target) as client:
        before = scrape(server).get('loraplex_request_success_total{finished_reason="cancelled"}', 0)
        stream = client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True)
        next(stream), next(stream)
        assert scrape(server)["loraplex_num_requests_running"] == 1
        stream.cancel()
        assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0)
        assert scrape(server)['loraplex_request_success_total{finished_reason="cancelled"}'] == before + 1


def test_an_async_stream_left_or_cancelled_stops_on_the_server(server, monkeypatch):
    runner = server.serving.engine.runner
    decode_step = runner.decode_step  # 480 steps take >= 2.4 s: only a cancel ends them early
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(0.005), decode_step(batch))[1])
    key = 'loraplex_request_success_total{finished_reason="cancelled"}'

    async def cancelled_after(leave) -> bool:
        before = scrape(server).get(key, 0)
        async with AsyncClient(server.target, timeout=60) as client:
            await leave(client)
            # the client stays open and the event loop blocked (a caller busy with other work): only a cancel
            # made at the moment the stream was left can end the row
            return wait_for(lambda: scrape(server).get(key, 0) == before + 1) and \
                scrape(server)["loraplex_num_requests_running"] == 0

    async def break_out(client):
        async for _ in client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True):
            break

    async def cancel(client):
        stream = client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True)
        await anext(stream)
        stream.cancel()  # the stream is still referenced: only the cancel ends it

    async def cancel_inside(client):
        stream = client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True)
        async for _ in stream:
            stream.cancel()  # the loop then ends as after a break (grpc's read would raise CancelledError)

    async def close(client):
        async with contextlib.aclosing(client.generate_stream([5, 6], "v1", max_new_tokens=480,
                                                              ignore_eos=True)) as stream:
            await anext(stream)
    assert asyncio.run(cancelled_after(break_out))
    assert asyncio.run(cancelled_after(cancel))
    assert asyncio.run(cancelled_after(close))
    assert asyncio.run(cancelled_after(cancel_inside))


def test_deadline_frees_its_row(server, monkeypatch):
    runner, steps = server.serving.engine.runner, []
    decode_step = runner.decode_step

    def slow_step(batch):  # 480 steps take >= 2.4 s, whatever the machine: the deadline ends it while it runs
        steps.append(len(batch))
        time.sleep(0.005)
        return decode_step(batch)
    monkeypatch.setattr(runner, "decode_step", slow_step)
    with Client(server.target, timeout=0.5) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate([5, 6], "v1", max_new_tokens=480, ignore_eos=True)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0)
    assert 0 < len(steps) < 479  # it was decoding, and stopped long before its 480 tokens


def test_reflection_lists_both_services(server):
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"loraplex.v1.Inference", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= services


def test_metrics_present_and_increasing(server):
    names = ["loraplex_time_to_first_token_seconds_count", "loraplex_inter_token_latency_seconds_count",
             "loraplex_e2e_request_latency_seconds_count", "loraplex_request_queue_time_seconds_count",
             "loraplex_prompt_tokens_total", "loraplex_generation_tokens_total"]
    before = scrape(server)
    with Client(server.target, timeout=30) as client:
        client.generate([5, 6, 7], "small", max_new_tokens=4, ignore_eos=True)
    after = scrape(server)
    for name in names:
        assert after[name] > before.get(name, 0), name
    assert after["loraplex_generation_tokens_total"] - before.get("loraplex_generation_tokens_total", 0) >= 4
    assert after['loraplex_adapter_requests_total{adapter="small"}'] >= 1
    assert after['loraplex_request_success_total{finished_reason="length"}'] >= 1
    assert "loraplex_num_requests_running" in after and "loraplex_num_requests_waiting" in after
    assert any(k.startswith("loraplex_batch_size_bucket") for k in after)
    assert any(k.startswith("loraplex_adapter_load_seconds_count") for k in after)
    handled = [k for k in after if k.startswith("grpc_server_handled_total") and 'grpc_method="Generate"' in k]
    assert handled and any('grpc_code="OK"' in k for k in handled)


def test_warm_up_is_not_counted_as_a_request(model_dirs):
    server = start_server(model_dirs["llama"], None)
    try:
        fresh = scrape(server)
        counted = [k for k, v in fresh.items() if v and k.startswith((
            "loraplex_time_to_first_token_seconds_count", "loraplex_e2e_request_latency_seconds_count",
            "loraplex_request_queue_time_seconds_count", "loraplex_request_success_total",
            "loraplex_adapter_requests_total", "loraplex_prompt_tokens_total", "loraplex_generation_tokens_total"))]
        assert counted == []
        with Client(server.target, timeout=30) as client:
            client.generate([5, 6], max_new_tokens=2, ignore_eos=True)
        after = scrape(server)
        assert after["loraplex_time_to_first_token_seconds_count"] == 1
        assert after['loraplex_adapter_requests_total{adapter="__base__"}'] == 1
    finally:
        server.stop()


def test_unknown_adapter_ids_take_no_metric_label(server, adapter_root):
    """Per-adapter labels are bounded (first 100 ids, then `other`); ids that resolve to nothing must not use
    them up, or a flood of bad requests would leave every real adapter labelled `other`."""
    shutil.copytree(adapter_root / "v1", adapter_root / "labelled")
    with Client(server.target, timeout=30) as client:
        for i in range(101):
            with pytest.raises(grpc.RpcError) as info:
                client.generate([5], f"ghost-{i}", max_new_tokens=1)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        client.generate([5], "labelled", max_new_tokens=1)
    assert scrape(server)['loraplex_adapter_requests_total{adapter="labelled"}'] == 1


def test_two_concurrent_first_loads_one_succeeds_one_already_exists(server, adapter_root, monkeypatch):
    shutil.copytree(adapter_root / "v1", adapter_root / "twice")
    registry = server.serving.registry
    read = registry._reader

    def slow(*args):  # the second LoadAdapter arrives while the first is still reading
        time.sleep(0.3)
        return read(*args)
    monkeypatch.setattr(registry, "_reader", slow)
    codes = []

    def load():
        with Client(server.target, timeout=30) as client:
            try:
                client.load_adapter("twice")
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS], key=str)
    with Client(server.target, timeout=30) as client:
        assert client.get_adapter("twice").version == 1


def test_adapter_info_and_tiers(server):
    with Client(server.target, timeout=30) as client:
        client.generate([5], "small", max_new_tokens=1)
        info = client.get_adapter("small")
        assert info.kind == pb.ADAPTER_KIND_LORA and info.rank == 2 and info.heads == 1
        assert info.tier == pb.ADAPTER_TIER_DEVICE and info.size_bytes > 0
        assert set(info.target_modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
        assert "small" in [a.adapter_id for a in client.list_adapters()]


def test_host_memory_budget_evicts_to_disk_and_reloads(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root, adapter_cache_bytes=1)
    try:
        with Client(server.target, timeout=30) as client:
            want = list(client.generate([5, 6], "v1", max_new_tokens=5, ignore_eos=True).token_ids)
            client.load_adapter("v2")  # over budget: v1 leaves host memory
            assert client.get_adapter("v1").tier == pb.ADAPTER_TIER_DISK
            assert client.get_adapter("v2").tier in (pb.ADAPTER_TIER_CPU, pb.ADAPTER_TIER_DEVICE)
            metrics = scrape(server)
            assert metrics['loraplex_adapters_loaded{tier="disk"}'] == 1
            assert metrics['loraplex_adapters_loaded{tier="cpu"}'] == 1
            assert list(client.generate([5, 6], "v1", max_new_tokens=5, ignore_eos=True).token_ids) == want
    finally:
        server.stop()


def test_host_memory_budget_is_a_hard_limit_counting_adapters_requests_hold(model_dirs, adapter_root, tmp_path):
    """Requests in flight hold their adapter's weights, which no eviction can free: a request whose adapter would
    take host memory beyond --adapter-cache-bytes waits (holding nothing) until one of them finishes, instead of
    being read anyway (queued requests on distinct adapters grew the server by ~400 MB under a 4 MB budget);
    beyond --max-queue-size such waiters, and for LoadAdapter, it is RESOURCE_EXHAUSTED."""
    root = tmp_path / "root"
    for name in ("a", "b", "c", "d"):
        shutil.copytree(adapter_root / "v1", root / name)
    size = (adapter_root / "v1" / "adapter_model.safetensors").stat().st_size  # fp32 factors: their size in memory
    server = start_server(model_dirs["llama"], root, adapter_cache_bytes=2 * size + size // 2,  # two fit, not three
                          max_queue_size=1)
    registry = server.serving.registry
    try:
        with Client(server.target, timeout=60) as client:
            streams = []
            for name in "ab":  # one at a time: the queue holds one
                streams.append(client.generate_stream([5, 6], name, max_new_tokens=480, ignore_eos=True))
                next(streams[-1])
            waiting = client.inference.Generate.future(build_request([5, 6], "c", max_new_tokens=2, ignore_eos=True))
            assert wait_for(lambda: scrape(server)["loraplex_num_requests_waiting"] == 1)
            code, details = status_of(client.generate, [5, 6], "d", max_new_tokens=2)  # a second waiter: too many
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--adapter-cache-bytes" in details
            assert "--max-queue-size" in details
            # requests that cannot run fail at once, not after their turn behind the waiter
            assert status_of(client.generate, [5, 6], "nope", max_new_tokens=2)[0] == grpc.StatusCode.NOT_FOUND
            assert status_of(client.generate, [5, 6], "d", max_new_tokens=0)[0] == grpc.StatusCode.INVALID_ARGUMENT
            code, details = status_of(client.load_adapter, "d")
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in details
            assert client.get_adapter("a").tier != pb.ADAPTER_TIER_DISK  # held adapters are never evicted
            assert not waiting.done() and "c" not in [a.adapter_id for a in client.list_adapters()]
            streams[0].cancel()  # frees room: the waiter goes in
            assert len(waiting.result(timeout=30).token_ids) == 2
            assert client.get_adapter("a").tier == pb.ADAPTER_TIER_DISK  # evicted once released
            streams[1].cancel()
        assert wait_for(lambda: not registry._held)  # every hold released: finished, cancelled and refused alike
        assert wait_for(lambda: server.serving.engine.idle())
        assert scrape(server)["loraplex_num_requests_waiting"] == 0
    finally:
        server.stop()


def test_an_adapter_out_of_memory_is_not_starved_by_steady_traffic_on_those_in_memory(model_dirs, adapter_root,
                                                                                        tmp_path):
    """Steady overlapping traffic on two adapters in memory holds the whole budget; a request for a third one
    still gets in (requests arriving after it wait behind it, so the holds drain), and an adapter that cannot fit
    beside the pinned ones is refused at once rather than left waiting."""
    import asyncio

    from clients.client import AsyncClient
    root = tmp_path / "root"
    for name in "abcd":
        shutil.copytree(adapter_root / "v1", root / name)
    size = (adapter_root / "v1" / "adapter_model.safetensors").stat().st_size
    server = start_server(model_dirs["llama"], root, adapter_cache_bytes=2 * size + size // 2)
    try:
        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                stop = asyncio.Event()

                async def hot(name, i):
                    served = 0
                    while not stop.is_set():
                        await client.generate([5, 6], name, max_new_tokens=20 + 7 * ((served + i) % 5),
                                              ignore_eos=True)
                        served += 1
                    return served

                async def cold():
                    await asyncio.sleep(0.5)  # the hot adapters hold the budget by now
                    try:
                        async with AsyncClient(server.target, timeout=10) as other:
                            return len((await other.generate([5, 6], "c", max_new_tokens=2, ignore_eos=True)).token_ids)
                    finally:
                        stop.set()
                return await asyncio.gather(cold(), *[hot(name, i) for i, name in enumerate("aaaabbbb")])
        cold_tokens, *hot_served = asyncio.run(run())
        assert cold_tokens == 2 and all(n >= 1 for n in hot_served)
        with Client(server.target, timeout=30) as client:
            client.load_adapter("a", replace=True, pin=True), client.load_adapter("b", replace=True, pin=True)
            code, details = status_of(client.generate, [5, 6], "d", max_new_tokens=2)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "beside the pinned adapters" in details
    finally:
        server.stop()


def test_a_client_that_leaves_while_waiting_for_adapter_memory_is_counted(model_dirs, adapter_root, tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "root"
    for name in "ab":
        shutil.copytree(adapter_root / "v1", root / name)
    size = (adapter_root / "v1" / "adapter_model.safetensors").stat().st_size
    server = start_server(model_dirs["llama"], root, adapter_cache_bytes=size + size // 2)  # one at a time
    runner = server.serving.engine.runner
    decode_step = runner.decode_step  # 400 steps take >= 2 s: "a" holds the budget throughout
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(0.005), decode_step(batch))[1])
    key = 'loraplex_request_success_total{finished_reason="cancelled"}'
    try:
        with Client(server.target, timeout=60) as client:
            holding = client.generate_stream([5, 6], "a", max_new_tokens=400, ignore_eos=True)
            next(holding)
            before = scrape(server).get(key, 0)
            with Client(server.target, timeout=0.5) as hasty:
                code, _ = status_of(hasty.generate, [5, 6], "b", max_new_tokens=2)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_for(lambda: scrape(server).get(key, 0) == before + 1)
            assert scrape(server)["loraplex_num_requests_waiting"] == 0
            holding.cancel()
    finally:
        server.stop()


def test_budget_accounting_survives_churn(model_dirs, adapter_root, tmp_path):
    """Concurrent requests on six adapters under a budget for two, with cancels, deadlines, a hot-swap and a drained
    unload in between: every request ends with tokens (after waiting for room) or its client's own exit, and
    afterwards no hold is left and host memory is back within the budget."""
    import asyncio
    import random

    from clients.client import AsyncClient
    root = tmp_path / "root"
    names = [f"a{i}" for i in range(6)]
    for name in names:
        shutil.copytree(adapter_root / "v1", root / name)
    size = (adapter_root / "v1" / "adapter_model.safetensors").stat().st_size
    server = start_server(model_dirs["llama"], root, adapter_cache_bytes=2 * size + size // 2)
    registry = server.serving.registry
    rng = random.Random(0)

    async def one(client, hasty, i):
        name = rng.choice(names)
        try:
            if i % 5 == 0:  # a stream the client leaves after its first token
                stream = client.generate_stream([5, 6], name, max_new_tokens=200, ignore_eos=True)
                await stream.__anext__()
                stream.cancel()
                return "left"
            reply = await (hasty if i % 7 == 0 else client).generate(  # hasty: a 50 ms deadline
                [5, 6, i % 50 + 7], name, max_new_tokens=rng.randint(1, 30), ignore_eos=True)
            return "ok" if reply.token_ids else "empty"
        except grpc.RpcError as err:
            return err.code().name

    async def admin(client):
        await client.generate([5, 6], "a2", max_new_tokens=1)  # loaded (and maybe evicted) before its unload
        outcomes = []
        for call in (lambda: client.load_adapter("a1", replace=True), lambda: client.unload_adapter("a2", drain=True)):
            try:
                await call()
                outcomes.append("ok")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
        return outcomes

    async def run():
        async with AsyncClient(server.target, timeout=60) as client, \
                AsyncClient(server.target, timeout=0.05) as hasty:
            return await asyncio.gather(admin(client), *[one(client, hasty, i) for i in range(80)])
    try:
        admin_outcomes, *outcomes = asyncio.run(run())
        assert set(outcomes) <= {"ok", "left", "DEADLINE_EXCEEDED"}, outcomes  # over the budget, requests wait
        assert outcomes.count("ok") >= 40
        assert set(admin_outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}, admin_outcomes
        assert wait_for(lambda: not registry._held and server.serving.engine.idle(), timeout=30)
        assert registry.resident_bytes() <= 2 * size + size // 2
        with Client(server.target, timeout=30) as client:  # and it still serves
            assert len(client.generate([5, 6], "a0", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        server.stop()


def test_hot_swap_running_request_keeps_its_version(server, adapter_root):
    prompt, n = [9, 8, 7], 60
    with Client(server.target, timeout=60) as client:
        old = list(client.generate(prompt, "v1", max_new_tokens=n, ignore_eos=True).token_ids)
        new = list(client.generate(prompt, "v2", max_new_tokens=n, ignore_eos=True).token_ids)
        assert old != new
        client.load_adapter("swap", replace=True)
        version = client.get_adapter("swap").version
        stream = client.generate_stream(prompt, "swap", max_new_tokens=n, ignore_eos=True)
        got = list(next(stream).token_ids)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(adapter_root / "v2" / name, adapter_root / "swap" / name)
        assert client.load_adapter("swap", replace=True).version == version + 1
        after = list(client.generate(prompt, "swap", max_new_tokens=n, ignore_eos=True).token_ids)
        for message in stream:
            got.extend(message.token_ids)
    assert got == old, "the running request changed adapter version mid-generation"
    assert after == new


def test_a_replace_keeps_the_pin_and_counts_the_old_versions_rows(server, monkeypatch):
    runner = server.serving.engine.runner
    decode_step = runner.decode_step  # 400 steps take >= 2 s: the stream still runs while it is looked at
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(0.005), decode_step(batch))[1])
    with Client(server.target, timeout=60) as client:
        assert client.load_adapter("small", replace=True, pin=True).pinned
        stream = client.generate_stream([5, 6], "small", max_new_tokens=400, ignore_eos=True)
        next(stream)
        swapped = client.load_adapter("small", replace=True)  # pin unset: kept (a deploy is such a replace)
        assert swapped.pinned
        assert client.get_adapter("small").active_requests == 1  # the stream runs on the version before
        stream.cancel()
        assert not client.load_adapter("small", replace=True, pin=False).pinned  # unpinned only when asked
        assert not client.load_adapter("small", replace=True).pinned


def test_health_not_serving_until_model_is_warm(model_dirs, monkeypatch):
    gate = threading.Event()
    real = server_app.build_serving

    def gated(*args):
        gate.wait(60)
        return real(*args)
    monkeypatch.setattr(server_app, "build_serving", gated)
    config = server_app.ServerConfig(model=str(model_dirs["llama"]), port=0, metrics_port=0, log_level="WARNING")
    background = server_app.BackgroundServer(config)
    threading.Thread(target=background.start, daemon=True).start()
    assert wait_for(lambda: background.ports is not None)  # bound, model still loading
    with Client(f"127.0.0.1:{background.ports.grpc}", timeout=5) as client:
        assert client.health() == NOT_SERVING and client.health("loraplex.v1.Inference") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            client.generate("hi")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
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
    background = server_app.BackgroundServer(ServerConfig(model=str(model_dirs["llama"]), port=0, metrics_port=0,
                                                          threads=1, log_level="WARNING"))
    threading.Thread(target=background.start, kwargs={"timeout": 60}, daemon=True).start()
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
    with the default action, exit -15); a second one while the model loads exits at once."""
    for signals, code in ((1, 0), (2, 1)):
        proc, _ = _server_process(model_dirs["llama"])
        try:
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.05)
            assert proc.wait(timeout=60) == code
            log = proc.stdout.read()
            assert "ready" not in log and ("stopped" in log if code == 0 else "while the model loads" in log), log
        finally:
            proc.kill()


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
    finally:
        proc.kill()


def test_requests_left_when_the_grace_runs_out_hear_why(model_dirs, monkeypatch, caplog):
    """A request still waiting when the drain starts ends at once with UNAVAILABLE (it can start elsewhere now), a
    stream still running when the grace period is over with UNAVAILABLE saying so; the transport cuts neither
    (grpc would log a traceback for each)."""
    server = start_server(model_dirs["llama"], None, grace_period=0.0, max_batch_size=1)
    runner = server.serving.engine.runner
    decode_step = runner.decode_step
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(0.005), decode_step(batch))[1])
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
    runner = server.serving.engine.runner
    decode_step = runner.decode_step  # 300 steps take >= 1.5 s: the stream runs through the shutdown's start
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(0.005), decode_step(batch))[1])
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


def test_health_watch_streams_the_serving_status(server):
    """Health/Watch (what gRPC client-side health checking uses) writes through context.write, not by yielding."""
    from grpc_health.v1 import health_pb2_grpc
    with grpc.insecure_channel(server.target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(call).status == SERVING
        call.cancel()

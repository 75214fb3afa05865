"""Cancellation, deadlines, health, reflection, metrics, hot-swap and adapter residency (start-up and shutdown:
test_shutdown.py; the host-memory budget for adapters: test_adapter_memory.py)."""
import asyncio
import contextlib
import shutil
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from clients.client import AsyncClient, Client
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, slow_decode, start_server, status_of, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


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


def test_cancelled_streams_are_counted_as_cancelled_by_grpc_metrics(server):
    """grpc closes a stream handler's generator (GeneratorExit) or cancels its task when the client leaves,
    depending on where it is: either way grpc_server_handled_total says CANCELLED, never UNKNOWN."""
    label = ('grpc_server_handled_total{grpc_code="%s",grpc_method="GenerateStream",'
             'grpc_service="loraplex.v1.Inference",grpc_type="server_stream"}')
    before = scrape(server)
    with Client(server.target) as client:
        for read in (1, 2, 5) * 8:  # each stream started on the server (a cancel before may never reach it)
            stream = client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True)
            for _ in range(read):
                next(stream)
            stream.cancel()
            time.sleep(0.05)
    assert wait_for(lambda: scrape(server).get(label % "CANCELLED", 0) - before.get(label % "CANCELLED", 0) == 24)
    assert scrape(server).get(label % "UNKNOWN", 0) == before.get(label % "UNKNOWN", 0)


def test_an_async_stream_left_or_cancelled_stops_on_the_server(server, monkeypatch):
    slow_decode(server, monkeypatch)  # 480 steps take >= 2.4 s: only a cancel ends them early
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
    label = 'grpc_server_handled_total{grpc_code="%s",grpc_method="%s",grpc_service="loraplex.v1.Inference",' \
            'grpc_type="%s"}'
    calls = [("Generate", "unary"), ("GenerateStream", "server_stream")]
    before = scrape(server)

    async def past_deadlines():  # a unary call and a stream, the deadline as realistic ones are (over a second)
        async with AsyncClient(server.target, timeout=1.5) as client:
            async def stream():
                return [m async for m in client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True)]
            return await asyncio.gather(client.generate([5, 6], "v1", max_new_tokens=480, ignore_eos=True),
                                        stream(), return_exceptions=True)
    for outcome in asyncio.run(past_deadlines()):
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0)
    assert 0 < len(steps) < 479  # it was decoding, and stopped long before its 480 tokens
    # the client's deadline ends the call before the server's own (which started later, on arrival): still counted
    # as past the deadline, not as a client's cancel
    after = scrape(server)
    for code, want in (("DEADLINE_EXCEEDED", 1), ("CANCELLED", 0)):
        assert [after.get(label % (code, *c), 0) - before.get(label % (code, *c), 0) for c in calls] == [want] * 2
    with Client(server.target, timeout=30) as client:  # a client's own cancel, its deadline far off: CANCELLED
        stream = client.generate_stream([5, 6], "v1", max_new_tokens=480, ignore_eos=True)
        next(stream)
        stream.cancel()
    cancelled, past = label % ("CANCELLED", *calls[1]), label % ("DEADLINE_EXCEEDED", *calls[1])
    assert wait_for(lambda: scrape(server).get(cancelled, 0) == after.get(cancelled, 0) + 1)
    assert scrape(server).get(past) == after.get(past)


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


def test_metrics_count_exactly(model_dirs, adapter_root):
    """Counters and histograms add up to what was sent, and the gauges read what runs (a fresh server: nothing
    else counted). Requests one at a time, so each prefill and decode step holds one row."""
    server = start_server(model_dirs["llama"], adapter_root)
    try:
        sent = [([5, 6, 7], "", 4), ([8, 9, 10, 11, 12], "small", 6), ([3] * 7, "small", 2)]
        with Client(server.target, timeout=60) as client:
            for prompt, adapter, new in sent:
                client.generate(prompt, adapter, max_new_tokens=new, ignore_eos=True)
            got = scrape(server)
            assert got["loraplex_prompt_tokens_total"] == 15 and got["loraplex_generation_tokens_total"] == 12
            for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
                assert got[f"loraplex_{name}_count"] == 3, name
            assert got["loraplex_inter_token_latency_seconds_count"] == 3 + 5 + 1  # between a request's tokens
            assert got['loraplex_request_success_total{finished_reason="length"}'] == 3
            assert got['loraplex_adapter_requests_total{adapter="small"}'] == 2
            assert got['loraplex_adapter_requests_total{adapter="__base__"}'] == 1
            assert got['loraplex_adapter_prompt_tokens_total{adapter="small"}'] == 12
            assert got['loraplex_adapter_prompt_tokens_total{adapter="__base__"}'] == 3
            assert got['loraplex_adapter_generation_tokens_total{adapter="small"}'] == 8
            assert got['loraplex_adapter_generation_tokens_total{adapter="__base__"}'] == 4
            assert got['loraplex_batch_size_count{phase="prefill"}'] == 3
            assert got['loraplex_batch_size_sum{phase="prefill"}'] == 3
            assert got['loraplex_batch_size_count{phase="decode"}'] == 9  # each request's tokens after its first
            assert got['loraplex_step_duration_seconds_count{phase="decode"}'] == 9
            assert got['loraplex_step_duration_seconds_count{phase="prefill"}'] == 3
            assert got['loraplex_step_duration_seconds_sum{phase="decode"}'] > 0
            assert got['loraplex_step_duration_seconds_sum{phase="prefill"}'] > 0
            stream = client.generate_stream([5, 6, 7], "small", max_new_tokens=400, ignore_eos=True)
            next(iter(stream))
            # the engine publishes its gauges just after it sends a step's tokens
            assert wait_for(lambda: scrape(server)["loraplex_kv_cache_token_slots_reserved"] > 0)
            running = scrape(server)
            assert running["loraplex_num_requests_running"] == 1 and running["loraplex_adapter_slots_used"] == 1
            assert running["loraplex_kv_cache_token_slots_reserved"] == 3 + 400  # one row, its prompt + max_new
            assert running["loraplex_kv_cache_token_slots"] >= 3 and running["loraplex_kv_cache_bytes"] > 0
            stream.cancel()
        assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0, timeout=10)
        idle = scrape(server)
        assert idle["loraplex_adapter_slots_used"] == 0 and idle["loraplex_kv_cache_token_slots_reserved"] == 0
        assert idle["loraplex_kv_cache_token_slots"] == 0 and idle["loraplex_kv_cache_bytes"] == 0
    finally:
        server.stop()


def test_warm_up_is_not_counted_as_a_request(model_dirs):
    server = start_server(model_dirs["llama"], None)
    try:
        fresh = scrape(server)
        counted = [k for k, v in fresh.items() if v and k.startswith((
            "loraplex_time_to_first_token_seconds_count", "loraplex_e2e_request_latency_seconds_count",
            "loraplex_request_queue_time_seconds_count", "loraplex_request_success_total",
            "loraplex_adapter_requests_total", "loraplex_prompt_tokens_total", "loraplex_generation_tokens_total",
            "loraplex_adapter_prompt_tokens_total", "loraplex_adapter_generation_tokens_total"))]
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
    slow_decode(server, monkeypatch)  # 400 steps take >= 2 s: the stream still runs while it is looked at
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


def test_adapter_info_counts_the_requests_waiting_for_it(model_dirs, adapter_root, monkeypatch):
    """A request queued behind a full batch is not running, yet it blocks an unload: GetAdapter and ListAdapters
    show it as waiting (an operator saw running=0 and an unload refused for a request in flight)."""
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=1)
    slow_decode(server, monkeypatch)
    try:
        with Client(server.target, timeout=60) as client:
            client.load_adapter("small")
            running = client.generate_stream([5, 6], "", max_new_tokens=400, ignore_eos=True)
            next(running)
            queued = client.generate_stream([5, 6], "small", max_new_tokens=4, ignore_eos=True)
            assert wait_for(lambda: client.get_adapter("small").waiting_requests == 1)
            info = {i.adapter_id: i for i in client.list_adapters()}["small"]
            assert (info.active_requests, info.waiting_requests) == (0, 1)
            code, message = status_of(client.unload_adapter, "small")
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 request in flight" in message
            running.cancel()
            assert len([t for m in queued for t in m.token_ids]) == 4
            assert client.get_adapter("small").waiting_requests == 0
    finally:
        server.stop()


def test_health_watch_streams_the_serving_status(server):
    """Health/Watch (what gRPC client-side health checking uses) writes through context.write, not by yielding."""
    from grpc_health.v1 import health_pb2_grpc
    with grpc.insecure_channel(server.target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(call).status == SERVING
        call.cancel()


def test_loads_are_logged_as_what_they_did(server, caplog):
    """The audit trail says "replaced" only where an earlier version was replaced, whatever the request asked;
    refused changes are in it too, and so are reads from disk on a request's behalf."""
    caplog.set_level("INFO", logger="loraplex.servicers")
    caplog.set_level("INFO", logger="loraplex.registry")
    with Client(server.target, timeout=30) as client:
        with contextlib.suppress(grpc.RpcError):  # other tests load it
            client.unload_adapter("swap", drain=True)
        caplog.clear()
        client.load_adapter("swap", replace=True)  # not loaded now: a first load
        client.load_adapter("swap", replace=True)
        client.unload_adapter("swap")
        with pytest.raises(grpc.RpcError):
            client.unload_adapter("swap")
        client.generate([5, 6], "swap", max_new_tokens=1)  # auto-loaded on first use
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if m.startswith("LoadAdapter 'swap'")]
    assert lines == ["LoadAdapter 'swap': version 1, loaded, not pinned",
                     "LoadAdapter 'swap': version 2, replaced, not pinned"], lines
    assert "UnloadAdapter 'swap' refused: NOT_FOUND: adapter 'swap' is not loaded" in messages
    assert any(m.startswith("read adapter 'swap' from disk (first use): version 1, lora, ") for m in messages)


def test_a_client_leaving_while_its_request_is_refused_is_counted_once_as_cancelled(server, monkeypatch):
    """Its deadline passes while the request is being prepared, then the preparation fails (here an adapter
    that is not found): every call ends in exactly one of the request counters, a client's leaving as cancelled."""
    from server.errors import NotFound
    from server.servicers import InferenceServicer

    def slow_and_refused(self, request, count=1):
        time.sleep(0.3)
        raise NotFound("adapter 'gone' not found")
    monkeypatch.setattr(InferenceServicer, "_prepare", slow_and_refused)
    counted = lambda m, name: sum(v for k, v in m.items() if k.startswith(name))  # noqa: E731
    cancelled = 'loraplex_request_success_total{finished_reason="cancelled"}'
    before = scrape(server)
    with Client(server.target, timeout=0.1) as client:
        assert status_of(client.generate, [5, 6], "gone", max_new_tokens=2)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: scrape(server).get(cancelled, 0) == before.get(cancelled, 0) + 1)
    time.sleep(0.3)
    after = scrape(server)
    assert counted(after, "loraplex_request_failure_total") == counted(before, "loraplex_request_failure_total")
    assert counted(after, "loraplex_request_success_total") == counted(before, "loraplex_request_success_total") + 1


def test_grpc_core_reply_to_a_departed_client_is_one_warning_line(server):
    """grpc logs a reply it could not send (the client left meanwhile) as an ERROR with its own traceback."""
    import logging
    import sys

    from server.interceptors import client_gone
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "server.pyx", 1,
                               "ExecuteBatchError raised in core by servicer method [%s]",
                               ("/loraplex.v1.Inference/Generate",), exc_info)
    assert client_gone(record) and record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage() == "[/loraplex.v1.Inference/Generate]: the reply could not be sent (the client had left)"
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "x", 1, "Unexpected error", None, None)
    assert client_gone(other) and other.levelname == "ERROR"
    assert client_gone in logging.getLogger("grpc._cython.cygrpc").filters  # the running server installed it

"""Requests and admin calls competing for device slots, threads and adapter reads: none may starve the others or
hold up unrelated work."""
import asyncio
import os
import shutil
import threading
import time

import grpc
import pytest

from clients.client import AsyncClient, Client
from tests.helpers import make_versions, start_server, wait_for

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    return make_versions(model_dirs["llama"], tmp_path_factory.mktemp("adapters"), 4)


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    s = start_server(model_dirs["llama"], adapter_root, max_batch_size=128, max_active_adapters=16)
    yield s
    s.stop()


def test_steady_traffic_on_a_resident_adapter_cannot_starve_one_waiting_for_a_slot(model_dirs, adapter_root):
    """One slot, held by a stream of overlapping v0 requests (it never drains while they keep joining it): a
    request for v1 waits for the slot and is served, because later v0 requests queue behind it."""
    s = start_server(model_dirs["llama"], adapter_root, max_active_adapters=1)

    async def go():
        async with AsyncClient(s.target, timeout=60) as client:
            stop = asyncio.Event()

            async def traffic():  # a new v0 request every 20 ms, each running longer than that
                calls = []
                while not stop.is_set():
                    calls.append(asyncio.ensure_future(client.generate(PROMPT, "v0", max_new_tokens=40,
                                                                       ignore_eos=True)))
                    await asyncio.sleep(0.02)
                await asyncio.gather(*calls)
            feeder = asyncio.ensure_future(traffic())
            try:
                await asyncio.sleep(0.3)
                reply = await asyncio.wait_for(client.generate(PROMPT, "v1", max_new_tokens=3, ignore_eos=True), 10)
                assert len(reply.token_ids) == 3
            finally:
                stop.set()
                await feeder
    try:
        asyncio.run(go())
    finally:
        s.stop()


def test_requests_waiting_on_one_adapter_do_not_hold_up_other_requests(server):
    """While an adapter's id is held (a long LoadAdapter replace, a slow read), more requests for it than any
    thread pool has threads wait, some of them already left by their clients; base-model requests, requests for
    other adapters and the Adapters service still answer at once (70 waiting on one id took every thread that
    resolves adapters, and every other adapter's requests timed out)."""
    with Client(server.target, timeout=30) as client:
        client.generate(PROMPT, "v1", max_new_tokens=1)  # in memory: nothing to read for it below
    lock = server.serving.registry.hold("v3")

    async def go():
        async with AsyncClient(server.target, timeout=30) as client, AsyncClient(server.target, timeout=0.3) as hasty:
            left = [asyncio.ensure_future(hasty.generate(PROMPT, "v3", max_new_tokens=2)) for _ in range(40)]
            stuck = [asyncio.ensure_future(client.generate(PROMPT, "v3", max_new_tokens=2)) for _ in range(80)]
            await asyncio.sleep(0.5)  # all are waiting on the id; the hasty ones' clients have left
            with Client(server.target, timeout=3) as quick:  # DEADLINE_EXCEEDED if they took the shared threads
                base = await asyncio.to_thread(quick.generate, PROMPT, "", max_new_tokens=2)
                other = await asyncio.to_thread(quick.generate, PROMPT, "v1", max_new_tokens=2)
                await asyncio.to_thread(quick.list_adapters)
            assert len(base.token_ids) == len(other.token_ids) == 2
            assert not any(call.done() for call in stuck)
            for call in left:
                with pytest.raises(grpc.RpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            lock.release()
            assert all(len(r.token_ids) == 2 for r in await asyncio.gather(*stuck))
    lock.acquire()
    try:
        asyncio.run(go())
    finally:
        try:
            lock.release()
        except RuntimeError:  # released inside, as planned
            pass


def _slow_reads(server, adapter_root, ids: list[str], monkeypatch, seconds: float) -> list[int]:
    """Copies of an adapter under `ids`, read `seconds` slower each; returns [the most reads seen at once]."""
    for name in ids:
        shutil.copytree(adapter_root / "v1", adapter_root / name)
    registry = server.serving.registry
    read, active, peak, lock = registry._reader, [0], [0], threading.Lock()

    def slow(*args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(seconds)
            return read(*args)
        finally:
            with lock:
                active[0] -= 1
    monkeypatch.setattr(registry, "_reader", slow)
    return peak


def test_cold_adapter_reads_at_once_are_bounded(server, adapter_root, monkeypatch):
    """New files are measured against the memory budget only once read: many first uses at once read a few
    adapters at a time (cores + 4), not all of them, however many requests wait."""
    ids = [f"cold{i}" for i in range(16)]
    peak = _slow_reads(server, adapter_root, ids, monkeypatch, 0.3)

    async def go():
        async with AsyncClient(server.target, timeout=60) as client:
            return await asyncio.gather(*[client.generate(PROMPT, i, max_new_tokens=1) for i in ids])
    assert all(len(r.token_ids) == 1 for r in asyncio.run(go()))
    assert 1 < peak[0] <= min(32, (os.cpu_count() or 1) + 4), peak[0]


def test_admin_calls_cut_before_they_start_are_not_counted_as_under_way(server, adapter_root, monkeypatch):
    """More LoadAdapter calls than the admin pool has threads, their clients gone before most could start: the
    count of registry changes under way (a shutdown freezes the state file while it is not 0) returns to 0."""
    for i in range(24):
        shutil.copytree(adapter_root / "v1", adapter_root / f"admin{i}")
    registry = server.serving.registry
    load = registry.load
    monkeypatch.setattr(registry, "load", lambda *args: (time.sleep(0.5), load(*args))[1])

    async def go():
        async with AsyncClient(server.target, timeout=0.2) as client:
            outcomes = await asyncio.gather(*[client.load_adapter(f"admin{i}") for i in range(24)],
                                            return_exceptions=True)
        assert all(isinstance(o, grpc.RpcError) for o in outcomes)  # every client gave up after 0.2 s
    asyncio.run(go())
    assert wait_for(lambda: server.serving.registry_changes.count == 0, timeout=10), \
        server.serving.registry_changes.count


def test_cold_reads_do_not_hold_up_requests_on_adapters_in_memory(server, adapter_root, monkeypatch):
    """Requests for many cold adapters at once wait for reads (a few at a time); a request for an adapter already in
    memory has nothing to read and must not wait behind them for a thread."""
    ids = [f"chill{i}" for i in range(24)]
    for name in ids:
        shutil.copytree(adapter_root / "v1", adapter_root / name)
    with Client(server.target, timeout=30) as client:
        client.generate(PROMPT, "v1", max_new_tokens=1)
    registry = server.serving.registry
    read = registry._reader
    monkeypatch.setattr(registry, "_reader", lambda *args: (time.sleep(1.0), read(*args))[1])

    async def go():
        async with AsyncClient(server.target, timeout=60) as client:
            cold = [asyncio.ensure_future(client.generate(PROMPT, i, max_new_tokens=1)) for i in ids for _ in range(4)]
            await asyncio.sleep(0.3)
            start = time.monotonic()
            warm = await client.generate(PROMPT, "v1", max_new_tokens=1)
            waited = time.monotonic() - start
            await asyncio.gather(*cold)
            return warm, waited
    warm, waited = asyncio.run(go())
    assert len(warm.token_ids) == 1 and waited < 0.9, waited


def test_cold_reads_of_many_ids_run_as_many_at_once_as_the_registry_allows(server, adapter_root, monkeypatch):
    """Requests arriving together for one cold id wait for its one read, on the loop: counted per request, the
    limit on reads at once let only one or two ids read at a time (12 s instead of 4 s below)."""
    ids = [f"brisk{i}" for i in range(12)]
    peak = _slow_reads(server, adapter_root, ids, monkeypatch, 0.5)

    async def go():
        async with AsyncClient(server.target, timeout=60) as client:
            calls = []
            for name in ids:  # each id's four requests together, the ids a moment apart
                calls += [asyncio.ensure_future(client.generate(PROMPT, name, max_new_tokens=1)) for _ in range(4)]
                await asyncio.sleep(0.01)
            return await asyncio.gather(*calls)
    assert all(len(r.token_ids) == 1 for r in asyncio.run(go()))
    assert peak[0] >= min(len(ids), server.serving.registry.reads_at_once) - 1, peak[0]  # (the last may start as the first ends)

"""Faults and operations under load: cancellation at scale, hot-swap under load, unload with requests in flight,
adapters surviving restarts, engine faults."""
import asyncio
import json
import os
import threading
import time

import grpc
import pytest

from clients import cli
from clients.client import AsyncClient, Client
from tests.helpers import make_versions, scrape, start_server, wait_for

C = grpc.StatusCode
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = make_versions(model_dirs["llama"], tmp_path_factory.mktemp("adapters"), 8)
    os.symlink(root / "v0", root / "hot")
    return root


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    s = start_server(model_dirs["llama"], adapter_root, max_batch_size=128, max_active_adapters=16)
    yield s
    s.stop()


def test_hundred_cancelled_streams_free_rows_and_kv_memory(server):
    loop = asyncio.new_event_loop()
    client = None

    async def start():
        nonlocal client
        client = AsyncClient(server.target, timeout=120)  # stays open: closing it would cancel the streams
        calls = [client.inference.GenerateStream(_request(i)) for i in range(100)]
        for call in calls:
            await call.read()  # every stream has its first token: all 100 rows hold KV memory
        return calls
    try:
        calls = loop.run_until_complete(start())
        before = scrape(server)
        assert before["loraplex_num_requests_running"] == 100 and before["loraplex_kv_cache_bytes"] > 0
        steps_before = before['loraplex_batch_size_count{phase="decode"}']
        start_time = time.monotonic()
        for call in calls:
            call.cancel()
        assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0, timeout=10)
        freed = time.monotonic() - start_time
        after = scrape(server)
    finally:
        if client is not None:
            loop.run_until_complete(client.close())
        loop.close()
    steps = after['loraplex_batch_size_count{phase="decode"}'] - steps_before
    print(f"100 cancelled streams: rows and {before['loraplex_kv_cache_bytes'] / 2**20:.1f} MiB of KV cache freed "
          f"in {freed * 1000:.0f} ms, {steps:.0f} decode steps after the cancels were sent")
    assert after["loraplex_kv_cache_bytes"] == 0 and after["loraplex_kv_cache_token_slots"] == 0
    assert steps <= 10  # each had 400 tokens to go; the engine drops flagged rows at its next step


def test_expired_deadlines_free_rows_and_kv_memory(server, monkeypatch):
    decode_step = server.serving.engine.runner.decode_step
    # 400 steps take >= 2 s on any machine: every deadline passes while its request runs (or waits for a row)
    monkeypatch.setattr(server.serving.engine.runner, "decode_step", lambda batch: (time.sleep(0.005),
                                                                                     decode_step(batch))[1])

    async def run():
        async with AsyncClient(server.target, timeout=0.5) as client:
            calls = [client.generate([5 + i, 6, 7], max_new_tokens=400, ignore_eos=True) for i in range(50)]
            return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(run())
    assert all(isinstance(r, grpc.RpcError) and r.code() == C.DEADLINE_EXCEEDED for r in results)
    assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0, timeout=10)
    after = scrape(server)
    assert after["loraplex_kv_cache_bytes"] == 0 and after["loraplex_num_requests_waiting"] == 0


def _request(i: int):
    from clients.client import build_request
    return build_request([5 + i % 50, 6, 7], max_new_tokens=400, ignore_eos=True)


def test_hot_swap_under_load_each_response_is_one_version(server, adapter_root):
    with Client(server.target, timeout=60) as client:
        expected = {tuple(client.generate(PROMPT, f"v{i}", max_new_tokens=12, ignore_eos=True).token_ids): i
                    for i in range(8)}
        assert len(expected) == 8, "the versions must be told apart by their outputs"
        client.load_adapter("hot")
    seen, bad, stop = [], [], threading.Event()

    async def streams():
        async with AsyncClient(server.target, timeout=60) as client:
            async def one():
                while not stop.is_set():
                    ids = tuple([t async for m in client.generate_stream(PROMPT, "hot", max_new_tokens=12,
                                                                          ignore_eos=True) for t in m.token_ids])
                    (seen if ids in expected else bad).append(expected.get(ids, ids))
            await asyncio.gather(*[one() for _ in range(32)])
    errors = []

    def work():
        try:
            asyncio.run(streams())
        except Exception as exc:  # reported by the assertion below, not lost in the thread
            errors.append(exc)
    worker = threading.Thread(target=work)
    worker.start()
    with Client(server.target, timeout=60) as admin:
        for swap in range(1, 51):
            link = adapter_root / "hot.next"
            os.symlink(adapter_root / f"v{swap % 8}", link)
            os.replace(link, adapter_root / "hot")  # the directory flips atomically
            assert admin.load_adapter("hot", replace=True).version == swap + 1
            time.sleep(0.01)
    stop.set()
    worker.join(timeout=120)
    assert not errors and not bad, f"{len(bad)} responses match no single version"
    assert len(seen) >= 32 and len(set(seen)) >= 3  # swaps really happened while streams ran


def test_unload_refuses_or_drains_requests_in_flight(server):
    with Client(server.target, timeout=60) as client:
        client.load_adapter("v1", replace=True)
        stream = client.generate_stream(PROMPT, "v1", max_new_tokens=300, ignore_eos=True)
        first = next(stream)
        with pytest.raises(grpc.RpcError) as info:
            client.unload_adapter("v1")
        assert info.value.code() == C.FAILED_PRECONDITION and "1 request in flight" in info.value.details()
        rest = []
        reader = threading.Thread(target=lambda: rest.extend(stream))
        reader.start()
        response = client.unload_adapter("v1", drain=True)
        reader.join(timeout=60)
        assert response.drained_requests == 1
        assert sum(len(m.token_ids) for m in [first, *rest]) == 300  # the drained request finished in full
        assert rest[-1].finish_reason  # ... before the unload returned
        assert "v1" not in [a.adapter_id for a in client.list_adapters()]


def test_unload_counts_a_request_caught_between_resolving_its_adapter_and_queueing(server, monkeypatch):
    """A Generate that has resolved its adapter but is not queued yet is still counted as in flight."""
    registry = server.serving.registry
    resolve, resolved, go_on = registry.resolve, threading.Event(), threading.Event()

    def paused(adapter_id):
        weights = resolve(adapter_id)
        if adapter_id == "v2":
            resolved.set()
            go_on.wait(30)
        return weights
    monkeypatch.setattr(registry, "resolve", paused)
    with Client(server.target, timeout=60) as client:
        client.load_adapter("v2", replace=True)
        replies, unload = [], {}
        generate = threading.Thread(target=lambda: replies.append(client.generate(PROMPT, "v2", max_new_tokens=4)))
        generate.start()
        assert resolved.wait(30)

        def try_unload():
            try:
                unload["response"] = client.unload_adapter("v2")
            except grpc.RpcError as err:
                unload["error"] = err
        unloader = threading.Thread(target=try_unload)
        unloader.start()
        time.sleep(0.3)  # the unload is waiting for the id, not racing past the request
        assert unloader.is_alive() and not unload
        go_on.set()
        generate.join(30), unloader.join(30)
        assert len(replies[0].token_ids) == 4
        assert unload["error"].code() == C.FAILED_PRECONDITION and "1 request in flight" in unload["error"].details()
        assert "v2" in [a.adapter_id for a in client.list_adapters()]


def test_a_client_gone_while_its_adapter_resolves_leaves_no_request_running(server, monkeypatch):
    """The deadline passes while the request is still being prepared (its adapter resolving, which cannot be
    interrupted): once queued, the request is cancelled at the engine's next step, not generated for nobody."""
    registry = server.serving.registry
    resolve, go_on = registry.resolve, threading.Event()

    def slow(adapter_id):
        if adapter_id == "v3":
            go_on.wait(30)
        return resolve(adapter_id)
    monkeypatch.setattr(registry, "resolve", slow)
    cancelled = 'loraplex_request_success_total{finished_reason="cancelled"}'
    before = scrape(server).get(cancelled, 0)
    with Client(server.target, timeout=0.5) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(PROMPT, "v3", max_new_tokens=40, ignore_eos=True)
    assert info.value.code() == C.DEADLINE_EXCEEDED
    go_on.set()
    assert wait_for(lambda: scrape(server).get(cancelled, 0) == before + 1, timeout=10)
    assert wait_for(lambda: server.serving.engine.idle(), timeout=10)


def test_a_drain_that_hits_its_deadline_harms_no_request(server):
    engine = server.serving.engine
    real = engine.runner.decode_step

    def slow(batch):  # long steps: the drain's pending engine calls are what its deadline cancels
        time.sleep(0.05)
        return real(batch)
    engine.runner.decode_step = slow
    try:
        with Client(server.target, timeout=60) as client:
            client.load_adapter("v7", replace=True)
            stream = client.generate_stream(PROMPT, "v7", max_new_tokens=40, ignore_eos=True)
            first = next(stream)
            for _ in range(3):
                with Client(server.target, timeout=0.3) as impatient:
                    with pytest.raises(grpc.RpcError) as info:
                        impatient.unload_adapter("v7", drain=True)
                    assert info.value.code() == C.DEADLINE_EXCEEDED
                    client.load_adapter("v7", replace=True)
            messages = [first, *stream]  # the abandoned drains must not have failed the engine step
            assert sum(len(m.token_ids) for m in messages) == 40 and messages[-1].finish_reason
    finally:
        engine.runner.decode_step = real


@pytest.mark.parametrize("body", ['{"adapters": 5}', '{"adapters": ["v2"]}', '[]', 'not json', '', '[' * 200_000])
def test_a_state_file_the_server_did_not_write_stops_the_start_and_is_left_untouched(model_dirs, adapter_root,
                                                                                      tmp_path, body, capsys):
    """The server writes its state file atomically, so one it cannot read is not its own (a mistyped --state-file
    naming another file): it used to be renamed away and replaced, a directory such as /tmp included."""
    state = tmp_path / "state.json"
    state.write_text(body)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(model_dirs["llama"]), "--adapter-root", str(adapter_root), "--port", "0",
                  "--metrics-port", "0", "--state-file", str(state)])
    assert exit_info.value.code == 2
    assert f"the adapter state file {state} is not one this server wrote" in capsys.readouterr().err
    assert state.read_text() == body and [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("where,needle", [("dir", "exists and is not a regular file"),
                                          ("missing/state.json", "does not exist")])
def test_a_state_file_path_that_cannot_be_one_is_refused_before_loading(tmp_path, where, needle, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--port", "0", "--metrics-port", "0", "--state-file", str(tmp_path / where)])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    assert (tmp_path / "dir" / "keep").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_loaded_adapters_survive_a_restart(model_dirs, adapter_root, tmp_path):
    state = tmp_path / "state.json"
    first = start_server(model_dirs["llama"], adapter_root, state_file=str(state))
    try:
        with Client(first.target, timeout=60) as client:
            client.load_adapter("v2", pin=True)
            client.load_adapter("v3")
            client.load_adapter("v4")
            client.unload_adapter("v4")
            client.generate(PROMPT, "v5", max_new_tokens=2)  # auto-loaded on first use: not recorded
    finally:
        first.stop()
    assert json.loads(state.read_text()) == {"adapters": [{"id": "v2", "pinned": True}, {"id": "v3", "pinned": False}]}
    assert [f.name for f in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind
    second = start_server(model_dirs["llama"], adapter_root, state_file=str(state), autoload_adapters=False)
    try:
        with Client(second.target, timeout=60) as client:
            loaded = {a.adapter_id: a.pinned for a in client.list_adapters()}
            assert loaded == {"v2": True, "v3": False}
            assert len(client.generate(PROMPT, "v3", max_new_tokens=2).token_ids) == 2
    finally:
        second.stop()


def test_restart_survives_a_recorded_adapter_that_vanished(model_dirs, adapter_root, tmp_path):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"adapters": [{"id": "gone", "pinned": False}, {"id": "v6", "pinned": False}]}))
    server = start_server(model_dirs["llama"], adapter_root, state_file=str(state))
    try:
        with Client(server.target, timeout=60) as client:
            assert [a.adapter_id for a in client.list_adapters()] == ["v6"]
    finally:
        server.stop()


def test_a_failing_step_fails_only_its_requests(server):
    engine = server.serving.engine
    real = engine.runner.decode_step
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(batch)
    engine.runner.decode_step = flaky
    internal = 'loraplex_request_failure_total{code="INTERNAL"}'
    before = scrape(server).get(internal, 0)
    try:
        with Client(server.target, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
            assert info.value.code() == C.INTERNAL and "injected" not in info.value.details()
            assert scrape(server)[internal] == before + 1  # counted once, as the client saw it
            assert len(client.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids) == 5
    finally:
        engine.runner.decode_step = real
    real_admit = engine._admit

    def buggy():
        if not engine._waiting:  # idle iterations run too: fail the first one that has a request to lose
            return real_admit()
        engine._admit = real_admit  # one failure, then back to normal
        raise RuntimeError("bug outside the forward")
    engine._admit = buggy
    try:
        with Client(server.target, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(PROMPT, max_new_tokens=2)
            assert info.value.code() == C.INTERNAL
    finally:
        engine._admit = real_admit
    with Client(server.target, timeout=60) as client:
        assert len(client.generate(PROMPT, max_new_tokens=2).token_ids) == 2 and engine.alive


def test_non_finite_logits_fail_their_row_alone(server):
    """One row's logits turn NaN (an fp16 overflow, say): that request fails with INTERNAL, never a garbage token,
    and the other row of its batch goes on to exactly the tokens it gets alone."""
    engine = server.serving.engine
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with Client(server.target, timeout=60) as client:
        alone = [client.generate(p, "v1", max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
    real = engine.runner.decode_step
    poisoned = []

    def poison(batch):
        logits = real(batch).clone()  # an inference tensor: writable once cloned here
        if len(batch) == 2 and not poisoned:
            poisoned.append(batch.rows[0].prompt_ids)
            logits[0, 3] = float("nan")
        return logits
    engine.runner.decode_step = poison
    gate = threading.Event()
    engine.call(lambda: gate.wait(10))  # the engine waits between steps until both requests are queued
    threading.Timer(0.5, gate.set).start()
    try:
        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                return await asyncio.gather(*[client.generate(p, "v1", max_new_tokens=6, ignore_eos=True)
                                              for p in prompts], return_exceptions=True)
        results = asyncio.run(run())
    finally:
        engine.runner.decode_step = real
    assert poisoned, "the two requests never shared a decode step"
    bad = prompts.index(poisoned[0])
    assert isinstance(results[bad], grpc.RpcError) and results[bad].code() == C.INTERNAL
    assert "not finite" in results[bad].details()
    assert list(results[1 - bad].token_ids) == list(alone[1 - bad])
    assert wait_for(lambda: engine.idle(), timeout=10) and engine.alive


def test_a_trim_that_runs_out_of_memory_releases_each_slot_once(server):
    """Retiring finished rows copies the KV cache; when that copy fails, the engine resets the batch and must
    release each row's adapter slot exactly once (a second release would free a slot still in use), and the request
    it had already finished is counted once, a success (the reset's error for it counted a failure too)."""
    engine = server.serving.engine
    real = engine.runner.keep
    counted = ('loraplex_request_success_total{finished_reason="length"}', "loraplex_request_failure_total")

    def totals():
        metrics = scrape(server)
        return [sum(v for k, v in metrics.items() if k.startswith(key)) for key in counted]
    before = totals()

    def failing(batch, keep):
        engine.runner.keep = real  # one failure, then back to normal
        raise MemoryError("injected: the trimmed cache does not fit")
    engine.runner.keep = failing
    try:
        with Client(server.target, timeout=60) as client:
            assert len(client.generate(PROMPT, "v1", max_new_tokens=2, ignore_eos=True).token_ids) == 2
            assert wait_for(lambda: engine.idle(), timeout=10) and engine.alive
            time.sleep(0.2)  # (a second count would have landed by now)
            assert totals() == [before[0] + 1, before[1]]
            assert len(client.generate(PROMPT, "v1", max_new_tokens=3, ignore_eos=True).token_ids) == 3
            assert wait_for(lambda: engine.idle(), timeout=10) and engine.alive
            assert client.get_adapter("v1").active_requests == 0
    finally:
        engine.runner.keep = real


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected death
def test_engine_thread_death_turns_health_not_serving(model_dirs):
    server = start_server(model_dirs["llama"], None)
    try:
        def die():
            raise SystemExit("injected: the engine thread dies")
        server.serving.engine.call(die)
        with Client(server.target, timeout=30) as client:
            assert wait_for(lambda: client.health() == 2, timeout=10)  # NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                client.generate(PROMPT, max_new_tokens=2)
            assert info.value.code() == C.UNAVAILABLE and "engine" in info.value.details()
    finally:
        server.stop()


@pytest.mark.parametrize("step", ["start_prefill", "advance", "decode_step"])
def test_a_failed_step_leaves_no_running_rows_or_held_slots_in_the_gauges(server, step):
    """Dashboards and autoscalers read these: after a step fails on an idle server they say 0 at once, not
    whatever they said before the failure until the next request."""
    runner = server.serving.engine.runner
    real = getattr(runner, step)

    def broken(*args):
        raise RuntimeError("injected fault")
    setattr(runner, step, broken)
    try:
        with Client(server.target, timeout=60) as client:
            with pytest.raises(grpc.RpcError):
                client.generate(PROMPT, "v2", max_new_tokens=5, ignore_eos=True)
    finally:
        setattr(runner, step, real)
    # published by the engine right after it has told the clients (not at the next request)
    assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0
                    and scrape(server)["loraplex_adapter_slots_used"] == 0, timeout=2), scrape(server)

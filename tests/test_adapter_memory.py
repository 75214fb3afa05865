"""The host-memory budget for adapters (--adapter-cache-bytes): eviction to disk, a hard limit counting the
adapters requests hold, waiting requests served in order and counted when their clients leave."""
import shutil
import time
from pathlib import Path

import grpc
import pytest

from clients.client import Client, build_request
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, slow_decode, start_server, status_of, wait_for


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(("v1", "v2")):
        make_peft_adapter(model_dirs["llama"], root / name, 21 + i, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    return root


def _over_copies(model_dirs, adapter_root, root, names, fit: int, **overrides):
    """A server over copies of adapter v1 under `root`, one per name in `names`, whose host memory for adapters
    (--adapter-cache-bytes) holds `fit` of them and not one more (fp32 factors: the file's size in memory)."""
    for name in names:
        shutil.copytree(adapter_root / "v1", root / name)
    size = (adapter_root / "v1" / "adapter_model.safetensors").stat().st_size
    return start_server(model_dirs["llama"], root, adapter_cache_bytes=fit * size + size // 2, **overrides)


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
    server = _over_copies(model_dirs, adapter_root, root, "abcd", 2, max_queue_size=1)
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
    server = _over_copies(model_dirs, adapter_root, root, "abcd", 2)
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


def test_a_pin_change_under_memory_pressure_needs_no_second_copy(model_dirs, adapter_root, tmp_path):
    """A replace whose files are the ones in memory (how an operator pins or unpins) is a new version of the same
    weights: it was re-read, and with a request holding the old copy, two copies did not fit the budget, so an
    unpin under pressure was refused. New files still need room for the second copy."""
    root = tmp_path / "root"
    server = _over_copies(model_dirs, adapter_root, root, "a", 1)  # one copy fits, not two
    try:
        with Client(server.target, timeout=60) as client:
            want = list(client.generate([5, 6], "a", max_new_tokens=6, ignore_eos=True).token_ids)
            assert client.load_adapter("a", replace=True, pin=True).pinned
            holding = client.generate_stream([5, 6], "a", max_new_tokens=480, ignore_eos=True)
            next(holding)
            key = server.serving.registry.get("a").weights.key
            (root / "a" / "training_log.json").write_text("{}")  # what a deploy records: no adapter file changes
            info = client.load_adapter("a", replace=True, pin=False)
            assert (info.pinned, info.version, info.tier) == (False, 3, pb.ADAPTER_TIER_DEVICE)
            assert server.serving.registry.get("a").weights.key == key  # the same weights: nothing read
            assert list(client.generate([5, 6], "a", max_new_tokens=6, ignore_eos=True).token_ids) == want
            shutil.copytree(adapter_root / "v2", root / "a", dirs_exist_ok=True)  # new files: a second copy
            code, details = status_of(client.load_adapter, "a", replace=True)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry when requests finish" in details
            assert client.get_adapter("a").version == 3
            holding.cancel()
    finally:
        server.stop()


def test_a_replace_reads_files_rewritten_in_place_with_their_modification_time_kept(model_dirs, adapter_root,
                                                                                    tmp_path):
    """Files of the same size rewritten in place (same inodes), their modification times set back as cp -p or
    rsync -t --inplace do: a replace must read them, not take them for the files in memory (it reported a new
    version while serving the old weights)."""
    import os
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "v1", root / "a")
    shutil.copytree(adapter_root / "v2", root / "b")  # what the new files give
    server = start_server(model_dirs["llama"], root)
    try:
        with Client(server.target, timeout=60) as client:
            old = list(client.generate([5, 6], "a", max_new_tokens=6, ignore_eos=True).token_ids)
            want = list(client.generate([5, 6], "b", max_new_tokens=6, ignore_eos=True).token_ids)
            client.load_adapter("a", replace=True)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                path, data = root / "a" / name, (adapter_root / "v2" / name).read_bytes()
                st = path.stat()
                with open(path, "r+b") as f:
                    f.write(data)
                    f.truncate()
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            client.load_adapter("a", replace=True)
            assert want != old
            assert list(client.generate([5, 6], "a", max_new_tokens=6, ignore_eos=True).token_ids) == want
    finally:
        server.stop()


def test_a_stream_its_client_stops_reading_frees_its_adapter_when_its_generation_ends(model_dirs, adapter_root,
                                                                                          tmp_path):
    """An unread stream's handler stays blocked on a token it cannot send (the HTTP/2 window is full), but its
    generation has ended: its adapter's memory is released then, not when the client reads, so a request on
    another adapter (which needs that room) is served meanwhile instead of waiting, and everyone behind it."""
    from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
    root = tmp_path / "root"
    server = _over_copies(model_dirs, adapter_root, root, "ab", 1)  # one at a time
    try:
        channel = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])  # a fixed window
        # 250 messages of ~300 bytes (the request id is echoed in each): more than the 64 KiB window
        unread = pb_grpc.InferenceStub(channel).GenerateStream(pb.GenerateRequest(
            adapter_id="a", prompt_token_ids=pb.TokenIds(ids=[5, 6]), request_id="r" * 256,
            stopping=pb.StoppingCriteria(max_new_tokens=250, ignore_eos=True)), timeout=120)
        key = 'loraplex_request_success_total{finished_reason="length"}'
        assert wait_for(lambda: scrape(server).get(key, 0) == 1, timeout=60)  # the engine is done with it
        assert scrape(server)['grpc_server_handling{grpc_method="GenerateStream",grpc_service="loraplex.v1.Inference",'
                              'grpc_type="server_stream"}'] == 1  # its handler still blocked
        with Client(server.target, timeout=20) as client:
            assert len(client.generate([5, 6], "b", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        assert len(list(unread)) == 251  # every token, then the end
        channel.close()
    finally:
        server.stop()


def test_a_stream_the_engine_fails_is_counted_even_if_its_client_never_reads_the_error(model_dirs, adapter_root,
                                                                                        tmp_path, monkeypatch):
    """Failures were counted when the handler took the error off its queue: an unread stream's handler, blocked on
    a full HTTP/2 window, never did, its client left (its deadline passed), and the call was in neither request
    counter. The client leaves once the engine has failed the stream (a fixed deadline raced the 248 steps on a
    loaded machine)."""
    from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "v1", root / "a")
    server = start_server(model_dirs["llama"], root)
    runner, steps = server.serving.engine.runner, [0]
    decode_step = runner.decode_step

    def failing(batch):
        steps[0] += 1
        if steps[0] == 248:  # after the window filled (~230 messages of ~280 bytes), before the 250th token
            raise RuntimeError("injected decode failure")
        return decode_step(batch)
    monkeypatch.setattr(runner, "decode_step", failing)
    counters = ("loraplex_request_success_total", "loraplex_request_failure_total")
    try:
        channel = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
        unread = pb_grpc.InferenceStub(channel).GenerateStream(pb.GenerateRequest(
            adapter_id="a", prompt_token_ids=pb.TokenIds(ids=[5, 6]), request_id="r" * 256,
            stopping=pb.StoppingCriteria(max_new_tokens=250, ignore_eos=True)), timeout=120)
        assert wait_for(lambda: steps[0] >= 248, timeout=60)
        assert wait_for(lambda: server.serving.engine.idle())  # the engine ended the stream: nothing read yet
        unread.cancel()  # the client leaves, as at its deadline
        assert unread.code() == grpc.StatusCode.CANCELLED
        channel.close()

        def total(prefix):
            return sum(v for k, v in scrape(server).items() if k.startswith(prefix))
        assert wait_for(lambda: server.serving.engine.idle())
        assert wait_for(lambda: total(counters[1]) == 1) and total(counters[0]) == 0  # once, as the engine ended it
        assert scrape(server)['loraplex_request_failure_total{code="INTERNAL"}'] == 1
    finally:
        server.stop()


def test_a_client_that_leaves_while_waiting_for_adapter_memory_is_counted(model_dirs, adapter_root, tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "root"
    server = _over_copies(model_dirs, adapter_root, root, "ab", 1)  # one at a time
    slow_decode(server, monkeypatch)  # 400 steps take >= 2 s: "a" holds the budget throughout
    key = 'loraplex_request_success_total{finished_reason="cancelled"}'
    try:
        with Client(server.target, timeout=60) as client:
            holding = client.generate_stream([5, 6], "a", max_new_tokens=400, ignore_eos=True)
            next(holding)
            counted = (key, 'loraplex_adapter_requests_total{adapter="b"}', "loraplex_e2e_request_latency_seconds_count")
            before = {k: scrape(server).get(k, 0) for k in counted}
            with Client(server.target, timeout=0.5) as hasty:
                code, _ = status_of(hasty.generate, [5, 6], "b", max_new_tokens=2)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            # counted as a row cancelled in the engine is: per adapter and in the latency too
            assert wait_for(lambda: all(scrape(server).get(k, 0) == before[k] + 1 for k in counted))
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
    server = _over_copies(model_dirs, adapter_root, root, names, 2)
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
        assert registry.resident_bytes() <= server.config.adapter_cache_bytes  # two copies and half of one
        with Client(server.target, timeout=30) as client:  # and it still serves
            assert len(client.generate([5, 6], "a0", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        server.stop()


@pytest.fixture
def one_adapter_in_memory(model_dirs, adapter_root, tmp_path, monkeypatch):
    """A server whose adapter memory holds one of adapters "a" and "b" at a time, auto-load off, decode slowed."""
    root = tmp_path / "root"
    server = _over_copies(model_dirs, adapter_root, root, "ab", 1, autoload_adapters=False)
    slow_decode(server, monkeypatch)
    yield server
    server.stop()


def _a_waits_for_bs_memory(client, new: int = 4):
    """(b's long stream, a's `new`-token stream that waits for host memory until b's ends)."""
    client.load_adapter("a")
    client.load_adapter("b")  # a goes to disk
    running = client.generate_stream([5, 6], "b", max_new_tokens=400, ignore_eos=True)
    next(running)  # b's weights are held: a cannot come back into memory yet
    waiting = client.generate_stream([5, 6], "a", max_new_tokens=new, ignore_eos=True)
    assert wait_for(lambda: client.get_adapter("a").waiting_requests == 1)
    return running, waiting


def test_requests_waiting_for_adapter_memory_are_counted_as_waiting_and_hold_off_an_unload(one_adapter_in_memory):
    """GetAdapter said 0 waiting for a request that waited for host memory (in the front end, before the engine's
    queue), and an unload without drain went ahead and failed it with NOT_FOUND."""
    server = one_adapter_in_memory
    with Client(server.target, timeout=60) as client:
        running, waiting = _a_waits_for_bs_memory(client)
        info = {i.adapter_id: i for i in client.list_adapters()}["a"]
        assert (info.tier, info.active_requests, info.waiting_requests) == (pb.ADAPTER_TIER_DISK, 0, 1)
        code, message = status_of(client.unload_adapter, "a")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 request in flight" in message
        running.cancel()
        assert len([t for m in waiting for t in m.token_ids]) == 4  # served, once b's memory was free
        assert client.get_adapter("a").waiting_requests == 0
        assert not server.serving.memory_waiting  # no entry outlives its requests


def test_a_drain_lets_requests_waiting_for_adapter_memory_finish_on_it(one_adapter_in_memory):
    """Review: a drain unloaded the id under requests still waiting for host memory, which then found it gone
    (NOT_FOUND with auto-load off) though they came before the unload; a plain unload refuses over them."""
    import threading
    server = one_adapter_in_memory
    with Client(server.target, timeout=60) as client:
        running, waiting = _a_waits_for_bs_memory(client, 100)  # 0.5 s of slowed steps: still running when counted
        unloaded = []
        drain = threading.Thread(target=lambda: unloaded.append(client.unload_adapter("a", drain=True)))
        drain.start()
        assert wait_for(lambda: "a" in server.serving.unloading)
        code, message = status_of(client.generate, [5, 6], "a", max_new_tokens=2)
        assert code == grpc.StatusCode.NOT_FOUND and "is being unloaded" in message  # new ones: as after it
        code, message = status_of(client.load_adapter, "a", replace=True)  # the drain would undo it
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "load it once that call returns" in message
        running.cancel()
        assert len([t for m in waiting for t in m.token_ids]) == 100  # served on the copy it came for
        drain.join(timeout=30)
        assert unloaded and unloaded[0].drained_requests == 1
        assert status_of(client.get_adapter, "a")[0] == grpc.StatusCode.NOT_FOUND
        assert not server.serving.memory_waiting and not server.serving.unloading


def test_a_request_waiting_for_adapter_memory_runs_on_the_version_in_memory_when_it_came(model_dirs, adapter_root,
                                                                                         tmp_path, monkeypatch):
    """(QA) A request for an adapter in memory, queued behind another's wait for room, resolves its adapter only once
    it goes on: a replace meanwhile gave it the new version, though it came before; and another adapter's load could
    evict its weights meanwhile, which it then read again from changed files. Now the replace waits for it to go on
    (as a drain does), and its weights are kept as recently used."""
    import threading
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "v1", root / "a")  # runs, holding its weights
    shutil.copytree(adapter_root / "v2", root / "b")  # does not fit beside "a": waits for room
    small = dict(r=2, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(model_dirs["llama"], tmp_path / "new", 31, **small)
    make_peft_adapter(model_dirs["llama"], root / "sw", 32, **small)  # fits beside "a"
    size = {n: (root / n / "adapter_model.safetensors").stat().st_size for n in ("a", "sw")}
    server = start_server(model_dirs["llama"], root, adapter_cache_bytes=size["a"] + size["sw"] + 16)
    slow_decode(server, monkeypatch)
    try:
        with Client(server.target, timeout=60) as client:
            client.load_adapter("sw")
            came_for = list(client.generate([5, 6], "sw", max_new_tokens=4, ignore_eos=True).token_ids)
            client.load_adapter("a")
            running = client.generate_stream([5, 6], "a", max_new_tokens=400, ignore_eos=True)
            next(running)
            waits = []
            for name in ("b", "sw"):  # "sw" is in memory, and queues behind "b"'s wait for room
                waits.append(client.generate_stream([5, 6], name, max_new_tokens=4, ignore_eos=True))
                assert wait_for(lambda: name in server.serving.memory_waiting)
            shutil.copytree(tmp_path / "new", root / "sw", dirs_exist_ok=True)  # new files for "sw"
            answers = []

            def replace():  # (its second copy may not fit while the requests it let in hold the first: retried)
                while not answers:
                    try:
                        answers.append(client.load_adapter("sw", replace=True))
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            answers.append(exc)
                        time.sleep(0.05)
            replacing = threading.Thread(target=replace)
            replacing.start()
            time.sleep(0.5)
            assert not answers and replacing.is_alive()  # waiting for the request that came before it
            running.cancel()  # room: "b" goes on, evicting "a" (not "sw"), then "sw"'s request
            got = [[t for m in stream for t in m.token_ids] for stream in waits]
            replacing.join(timeout=30)
            assert answers[0].version == 2, answers
            new = list(client.generate([5, 6], "sw", max_new_tokens=4, ignore_eos=True).token_ids)
        assert len(got[0]) == 4 and got[1] == came_for != new
    finally:
        server.stop()


def test_an_evicted_adapter_whose_directory_is_gone_leaves_the_list(model_dirs, adapter_root, tmp_path):
    """Soak QA: removing an adapter's directory (the README's way, with auto-load on, to take it out of service) left
    it listed as evicted, and in loraplex_adapters_loaded{tier="disk"}, for good, while requests were NOT_FOUND."""
    root = tmp_path / "root"
    server = _over_copies(model_dirs, adapter_root, root, "ab", 1)  # one at a time
    try:
        with Client(server.target, timeout=60) as client:
            client.load_adapter("a")
            client.load_adapter("b")  # a goes to disk
            shutil.rmtree(root / "a")
            assert [i.adapter_id for i in client.list_adapters()] == ["a", "b"]  # not looked at until a request
            code, message = status_of(client.generate, [5, 6], "a", max_new_tokens=2)
            assert code == grpc.StatusCode.NOT_FOUND and "not found under the adapter root" in message
            assert [i.adapter_id for i in client.list_adapters()] == ["b"]
            assert status_of(client.get_adapter, "a")[0] == grpc.StatusCode.NOT_FOUND
            assert scrape(server)['loraplex_adapters_loaded{tier="disk"}'] == 0
            assert '"a"' in Path(server.config.state_file).read_text()  # a restart drops it if it is still gone
            shutil.copytree(adapter_root / "v1", root / "a")  # back (a swap, a remount): served again
            assert len(client.generate([5, 6], "a", max_new_tokens=2, ignore_eos=True).token_ids) == 2
            assert client.get_adapter("a").version == 2  # not 1 again: (id, version) never names other files
    finally:
        server.stop()

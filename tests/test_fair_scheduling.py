"""--scheduling fair: waiting requests get rows in the order of the service their adapter received (the Virtual Token
Counter), so one adapter's flood cannot hold another's requests back behind all of it; --max-queue-per-adapter
bounds how much of the queue one adapter may hold. The queue's rules alone, then through the real server."""
import asyncio
import threading
from types import SimpleNamespace

import grpc
import pytest

from clients.client import AsyncClient, Client
from server.config import ConfigError, ServerConfig, check_config
from server.engine_messages import EngineRequest
from server.errors import ResourceExhausted
from server.fair_queue import OUTPUT_WEIGHT, PROMPT_WEIGHT, Pending, WaitingQueue
from tests.helpers import make_peft_adapter, scrape, start_server, wait_for

C = grpc.StatusCode


def request(adapter: str, name: str = "") -> EngineRequest:
    return EngineRequest(name or adapter, [1, 2, 3], SimpleNamespace(adapter_id=adapter) if adapter else None,
                         None, None, sink=lambda event: None)


def walk(queue: WaitingQueue, prompt_tokens: int = 10, leave=()) -> list[str]:
    """Every request in admission order, each taken and charged `prompt_tokens` unless its name is in `leave`."""
    order = []
    for r in queue.candidates():
        order.append(r.request_id)
        if r.request_id not in leave:
            queue.take(r, prompt_tokens=prompt_tokens)
    return order


def flood(queue: WaitingQueue) -> WaitingQueue:
    for i in range(5):
        queue.append(request("a", f"a{i}"))
    queue.append(request("b", "b0"))
    queue.append(request("", "base0"))
    return queue


def test_a_flood_on_one_adapter_does_not_hold_back_the_others():
    assert walk(flood(WaitingQueue(fair=True))) == ["a0", "b0", "base0", "a1", "a2", "a3", "a4"]
    assert walk(flood(WaitingQueue(fair=False))) == ["a0", "a1", "a2", "a3", "a4", "b0", "base0"]


def test_service_is_counted_in_prompt_and_generated_tokens():
    """An adapter whose rows generated many tokens waits behind one that was served less; a generated token counts
    OUTPUT_WEIGHT, a prompt token PROMPT_WEIGHT."""
    assert (PROMPT_WEIGHT, OUTPUT_WEIGHT) == (1.0, 2.0)
    queue = WaitingQueue()
    for name in ("a0", "b0", "a1", "b1"):
        queue.append(request(name[0], name))
    first = next(queue.candidates())
    queue.take(first, prompt_tokens=3)  # a: 3
    queue.charge(first, output_tokens=5)  # a: 13, generated while b waits
    second = next(queue.candidates())
    assert second.request_id == "b0"
    queue.take(second, prompt_tokens=12)  # b: 12 < 13
    assert next(queue.candidates()).request_id == "b1"
    queue.charge(second, output_tokens=1)  # b: 14 > 13
    assert next(queue.candidates()).request_id == "a1"


def test_an_idle_adapter_banks_no_credit():
    """An adapter that had nothing waiting while others were served is lifted to the lowest waiting counter when
    its requests come: it takes turns with them, it does not get every row until it caught up."""
    queue = WaitingQueue()
    for i in range(4):
        queue.append(request("a", f"a{i}"))
    assert walk(queue, leave={"a1", "a2", "a3"}) == ["a0", "a1", "a2", "a3"]  # a: 10, three still waiting
    for _ in range(50):
        queue.charge(request("a"), output_tokens=1)  # a: 110
    for i in range(3):
        queue.append(request("b", f"b{i}"))  # lifted to 110, not 0
    assert walk(queue) == ["a1", "b0", "a2", "b1", "a3", "b2"]  # a: 140, b: 140 (its queue emptied last)
    # with nothing waiting, a newcomer is lifted to the counter of the last adapter whose queue emptied
    queue.charge(request("a"), output_tokens=100)  # a: 340, running on while nothing waited
    queue.append(request("c", "c0"))
    queue.append(request("a", "a4"))  # a keeps its larger counter; c starts where b's queue emptied
    assert queue.level() == 140 and walk(queue) == ["c0", "a4"]


def test_an_adapter_that_ran_on_after_its_queue_emptied_counts_that_service():
    """With nothing waiting, a newcomer starts at the counter of the last adapter whose queue emptied as it stands
    now: the tokens that adapter's rows generated since count, so the newcomer does not get every row until it has
    caught up on them (it did, when the counter was taken at the moment the queue emptied)."""
    queue = WaitingQueue()
    queue.append(request("a", "a0"))
    walk(queue)  # a: 10, its queue empty
    for _ in range(100):
        queue.charge(request("a"), output_tokens=1)  # a: 210, its row generating while nothing waits
    for i in range(3):
        queue.append(request("b", f"b{i}"))
    queue.append(request("a", "a1"))
    assert walk(queue) == ["b0", "a1", "b1", "b2"]  # b at 210 beside a: turns (b first, the older)


def test_charging_a_token_does_not_look_at_every_waiting_adapter(monkeypatch):
    """A token's charge (per row per step) is a dict update: the level, a minimum over the waiting adapters, is
    looked at only for an adapter with no counter."""
    queue = WaitingQueue()
    for i in range(100):
        queue.append(request(f"id{i}"))
    running = request("id0")
    calls = []
    level = queue.level
    monkeypatch.setattr(queue, "level", lambda: (calls.append(1), level())[1])
    for _ in range(50):
        queue.charge(running, output_tokens=1)
    assert calls == []


def test_free_rows_go_to_the_first_requests_and_the_cap_counts_beyond_them():
    """At arrival, --max-queue-per-adapter counts an adapter's requests beyond the rows the batch has free, counted
    to the first requests, of any adapter. With 7 rows free and a cap of 2, the first adapter to burst gets 9 in, the
    next one 2 (not 9 each: the free rows are shared, not given to every adapter). (Where fair admission gives them
    to others instead, the excess is refused once the rows are given out: the server test below.)"""
    gauge = SimpleNamespace(inc=lambda n=1: None, dec=lambda n: None)
    pending = Pending(max_queue=64, per_tenant=2, rows=7, gauge=gauge)
    queued = []
    accepted = {}
    for adapter in ("a", "b"):
        accepted[adapter] = 0
        for i in range(12):
            try:
                pending.enter([request(adapter, f"{adapter}{i}")], queued.append)
                accepted[adapter] += 1
            except ResourceExhausted as refused:
                message = str(refused)
    assert accepted == {"a": 9, "b": 2} and len(queued) == 11 and pending.total == 11
    assert message == "adapter 'b' already has 2 requests waiting (--max-queue-per-adapter); retry later"
    pending.free = 0  # say the next step admitted 7 of a's (the free rows), leaving 2 of each waiting
    pending.leave(queued[:7])
    with pytest.raises(ResourceExhausted, match="adapter 'a' already has 2"):
        pending.enter([request("a")], queued.append)
    pending.enter([request("")], queued.append)  # another tenant still gets in
    pending.leave(queued[7:])
    assert pending.total == 0 and not pending._by


def test_requests_left_waiting_keep_their_place():
    """A request admission leaves waiting (no slot, no KV room yet) is passed over for that walk only, and its
    adapter's later requests still come up in their turn; the next walk offers it first again."""
    queue = flood(WaitingQueue())
    assert walk(queue, leave={"a0", "b0"}) == ["a0", "a1", "b0", "base0", "a2", "a3", "a4"]  # (a1: a still at 0)
    assert [r.request_id for r in queue] == ["a0", "b0"] and len(queue) == 2
    assert walk(queue) == ["b0", "a0"]  # b served least (0); a was charged for four
    assert not queue and list(queue.candidates()) == []


def test_cancelled_requests_leave_from_anywhere_and_clear_empties():
    queue = flood(WaitingQueue())
    middle = [r for r in queue if r.request_id == "a2"][0]
    queue.take(middle)
    assert [r.request_id for r in queue] == ["a0", "a1", "a3", "a4", "b0", "base0"]
    everyone = ["a0", "a1", "a3", "a4", "b0", "base0"]
    assert walk(queue, leave=set(everyone)) == everyone  # nobody served yet: equal counters, arrival order
    queue.clear()
    assert len(queue) == 0 and list(queue) == []


def test_counters_are_kept_for_the_adapters_that_need_them_only():
    """Thousands of adapters served one request each leave no counters behind but those above the level."""
    queue = WaitingQueue()
    for i in range(5000):
        r = request(f"id{i}")
        queue.append(r)
        walk(queue, prompt_tokens=1)
    assert len(queue._counters) <= 2 * len(queue._queues) + 65


# -- through the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    for i, name in enumerate(("flood", "other")):
        make_peft_adapter(model_dirs["llama"], root / name, 10 + i, r=4, lora_alpha=8, target_modules=["q_proj"])
    make_peft_adapter(model_dirs["llama"], root / "big", 12, r=16, lora_alpha=16,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return root


async def queue_while_held(server, client, adapters: list[str], before_release=None, **request) -> list:
    """Hold the engine between steps while one request per entry of `adapters` queues, one at a time in that order
    (requests sent together queue in any order), run `before_release`, then let the engine go on; the calls."""
    gate = threading.Event()
    server.serving.engine.call(lambda: gate.wait(30))
    calls = []
    try:
        for queued, adapter in enumerate(adapters, 1):
            calls.append(asyncio.create_task(client.generate([5, queued], adapter_id=adapter, ignore_eos=True,
                                                             **request)))
            assert await asyncio.to_thread(
                wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == queued)
        if before_release is not None:
            before_release()
    finally:
        gate.set()
    return calls


def admission_order(model_dirs, root, scheduling: str) -> list[str]:
    """One row at a time: five requests of 'flood', then one of 'other' and one of the base model, all queued while
    the engine is held; the adapters in the order their prompts were prefilled."""
    server = start_server(model_dirs["llama"], root, max_batch_size=1, scheduling=scheduling)
    runner = server.serving.engine.runner
    order = []
    start = runner.start_prefill

    def noted(rows, *rest):
        order.extend(r.state.request.adapter.adapter_id if r.state.request.adapter else "" for r in rows)
        return start(rows, *rest)
    runner.start_prefill = noted
    try:
        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                return await asyncio.gather(*await queue_while_held(server, client, ["flood"] * 5 + ["other", ""],
                                                                    max_new_tokens=3))
        assert all(len(r.token_ids) == 3 for r in asyncio.run(run()))
        metrics = scrape(server)
    finally:
        server.stop()
    # each adapter's wait is counted to it: the three labels add up to the queue-time histogram's sum
    waited = {a: metrics[f'loraplex_adapter_queue_time_seconds_sum{{adapter="{a}"}}']
              for a in ("flood", "other", "__base__")}
    admitted = {a: metrics[f'loraplex_adapter_queue_time_seconds_count{{adapter="{a}"}}']
                for a in ("flood", "other", "__base__")}
    assert all(w > 0 for w in waited.values()) and admitted == {"flood": 5, "other": 1, "__base__": 1}
    assert sum(waited.values()) == pytest.approx(metrics["loraplex_request_queue_time_seconds_sum"], rel=1e-9)
    return order


def test_the_server_admits_fairly_by_default_and_in_arrival_order_with_fifo(model_dirs, two_adapters):
    assert admission_order(model_dirs, two_adapters, "fair") == ["flood", "other", "", "flood", "flood", "flood",
                                                                 "flood"]
    assert admission_order(model_dirs, two_adapters, "fifo") == ["flood"] * 5 + ["other", ""]


def test_max_queue_per_adapter_refuses_one_adapters_excess_only(model_dirs, two_adapters):
    """At --max-queue-per-adapter 2 (and one row, free while the engine is held), 'flood' gets three requests in
    and its fourth is RESOURCE_EXHAUSTED naming the flag, while 'other' and the base model still get theirs in;
    GetServerInfo reports the limit and the scheduling."""
    server = start_server(model_dirs["llama"], two_adapters, max_batch_size=1, max_queue_per_adapter=2)
    engine = server.serving.engine
    try:
        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                info = await client.server_info()
                assert (info.scheduling, info.limits.max_queue_per_adapter) == ("fair", 2)
                gate = threading.Event()
                engine.call(lambda: gate.wait(30))
                calls = []
                for queued in range(1, 4):
                    calls.append(asyncio.create_task(client.generate([5], adapter_id="flood", max_new_tokens=2)))
                    assert await asyncio.to_thread(
                        wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == queued)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generate([5], adapter_id="flood", max_new_tokens=2)
                others = [asyncio.create_task(client.generate([5], adapter_id=a, max_new_tokens=2))
                          for a in ("other", "")]
                assert await asyncio.to_thread(
                    wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == 5)
                gate.set()
                return refused.value, await asyncio.gather(*calls, *others)
        refused, done = asyncio.run(run())
    finally:
        server.stop()
    assert refused.code() == C.RESOURCE_EXHAUSTED
    assert refused.details() == "adapter 'flood' already has 2 requests waiting (--max-queue-per-adapter); retry later"
    assert [len(r.token_ids) for r in done] == [2] * 5


def test_max_queue_per_adapter_bounds_requests_waiting_for_adapter_memory(model_dirs, two_adapters):
    """A flood on an adapter that does not fit host memory beside the adapters in flight waits for memory at most
    --max-queue-per-adapter requests deep, so it cannot fill that queue (--max-queue-size deep) for the others."""
    probe = start_server(model_dirs["llama"], two_adapters)
    try:
        with Client(probe.target, timeout=60) as client:
            small, big = client.load_adapter("flood").size_bytes, client.load_adapter("big").size_bytes
    finally:
        probe.stop()
    assert big > small + 16
    server = start_server(model_dirs["llama"], two_adapters, max_batch_size=2, max_queue_size=4,
                          max_queue_per_adapter=1, adapter_cache_bytes=2 * small + 16)
    try:
        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                holder = client.generate_stream([5, 6], adapter_id="flood", max_new_tokens=400, ignore_eos=True)
                await holder.__anext__()  # in flight: 'flood' holds its bytes, 'big' does not fit beside it
                waiting = asyncio.create_task(client.generate([5], adapter_id="big", max_new_tokens=2))
                assert await asyncio.to_thread(wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == 1)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generate([5], adapter_id="big", max_new_tokens=2)
                other = asyncio.create_task(client.generate([5], adapter_id="other", max_new_tokens=2))
                assert await asyncio.to_thread(wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == 2)
                holder.cancel()
                return refused.value, await asyncio.gather(waiting, other)
        refused, done = asyncio.run(run())
    finally:
        server.stop()
    assert refused.code() == C.RESOURCE_EXHAUSTED
    assert refused.details() == "adapter 'big' already has 1 requests waiting (--max-queue-per-adapter); retry later"
    assert [len(r.token_ids) for r in done] == [2, 2]


def outcomes_with_a_second_call_failing(server, monkeypatch, name: str) -> list:
    """Requests on 'flood' then 'other' queued while the engine is held, then admitted with server/admission.py's
    `name` raising (a bug) at its second call: each call's result or error."""
    import server.admission as admission_module
    real, made = getattr(admission_module, name), []

    def second_fails(*args):
        made.append(args)
        if len(made) == 2:
            raise RuntimeError("injected")
        return real(*args)

    async def run():
        async with AsyncClient(server.target, timeout=30) as client:
            calls = await queue_while_held(server, client, ["flood", "other"], max_new_tokens=3, before_release=(
                lambda: monkeypatch.setattr(admission_module, name, second_fails)))
            return await asyncio.gather(*calls, return_exceptions=True)
    return asyncio.run(run())


def test_a_request_whose_row_cannot_be_built_fails_alone(model_dirs, two_adapters, monkeypatch):
    """An exception building a newcomer's row (a bug) fails that request alone with INTERNAL; the request admitted
    just before it still runs, and nothing stays counted or holds a slot (it used to be lost: its client waited for
    its deadline, the engine counted it as pending forever and its slot stayed held)."""
    server = start_server(model_dirs["llama"], two_adapters, max_batch_size=4)
    engine = server.serving.engine
    try:
        first, second = outcomes_with_a_second_call_failing(server, monkeypatch, "make_generator")
        assert len(first.token_ids) == 3
        assert second.code() == C.INTERNAL and second.details() == "request failed inside the engine: RuntimeError"
        assert wait_for(lambda: engine.idle() and engine.bank.used == 0)
        assert engine._pending.total == 0 and len(engine._waiting) == 0
    finally:
        server.stop()


def test_an_adapters_burst_beyond_its_cap_is_refused_once_fair_admission_gave_its_free_rows_away(model_dirs,
                                                                                                 two_adapters):
    """8 rows free, --max-queue-per-adapter 2: 'flood' gets 10 requests in (2 + the free rows), then 'other' and the
    base model one each; fair admission gives those two their rows before flood's later ones, so flood would keep 4
    waiting: its 2 newest are refused (RESOURCE_EXHAUSTED, the cap's message) when the rows are given out, and the
    queue (4 deep) still takes another adapter's request."""
    server = start_server(model_dirs["llama"], two_adapters, max_batch_size=8, max_queue_per_adapter=2,
                          max_queue_size=4)
    engine = server.serving.engine
    try:
        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                calls = await queue_while_held(server, client, ["flood"] * 10 + ["other", ""], max_new_tokens=40)
                assert await asyncio.to_thread(wait_for, lambda: sum(c.done() for c in calls) >= 2)
                waiting = len(engine._waiting)
                late = await client.generate([9], adapter_id="other", max_new_tokens=2)
                return waiting, late, await asyncio.gather(*calls, return_exceptions=True)
        waiting, late, outcomes = asyncio.run(run())
    finally:
        server.stop()
    refused = [i for i, o in enumerate(outcomes) if isinstance(o, grpc.aio.AioRpcError)]
    assert refused == [8, 9] and waiting == 2 and len(late.token_ids) == 2
    assert {(outcomes[i].code(), outcomes[i].details()) for i in refused} == {
        (C.RESOURCE_EXHAUSTED, "adapter 'flood' already has 2 requests waiting (--max-queue-per-adapter); retry later")}
    assert all(len(o.token_ids) == 40 for o in outcomes if not isinstance(o, grpc.aio.AioRpcError))


def test_a_fault_in_the_admission_walk_fails_the_requests_it_had_admitted_too(model_dirs, two_adapters,
                                                                             monkeypatch):
    """A bug raising in the walk after a request was admitted (here the prefix-cache lookup of the next one): the
    engine fails what is in flight, and the admitted request hears it too (it was in no row yet: its client waited
    for its deadline, and it stayed counted and held its slot)."""
    server = start_server(model_dirs["llama"], two_adapters, max_batch_size=4)
    engine = server.serving.engine
    try:
        outcomes = outcomes_with_a_second_call_failing(server, monkeypatch, "cached_blocks")
        assert [(o.code(), o.details()) for o in outcomes] == [
            (C.INTERNAL, "request failed inside the engine: RuntimeError")] * 2
        assert wait_for(lambda: engine.idle() and engine.bank.used == 0)
        assert engine._pending.total == 0 and len(engine._waiting) == 0
    finally:
        server.stop()


def test_scheduling_flags_are_checked(model_dirs):
    with pytest.raises(ConfigError, match="--scheduling must be fair or fifo, got 'lifo'"):
        check_config(ServerConfig(model=str(model_dirs["llama"]), scheduling="lifo"))
    with pytest.raises(ConfigError, match=r"--max-queue-per-adapter must be >= 0 \(0: no limit of its own\), got -1"):
        check_config(ServerConfig(model=str(model_dirs["llama"]), max_queue_per_adapter=-1))

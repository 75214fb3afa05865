"""--scheduling fair preempts: with every row taken, a request of an adapter below its share of the rows gets one from
the adapter holding the most above its share; the preempted request waits first among its adapter's and resumes where
it stopped, giving exactly the tokens it gives uninterrupted. The policy alone, then through the real server."""
import asyncio
import shutil
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from clients.client import AsyncClient, Client
from loader.default_model import build_model_dir
from protos.loraplex.v1 import inference_pb2 as pb
from server.batch import Row
from server.engine import Engine
from server.engine_messages import EngineRequest
from server.errors import Unavailable
from server.fair_queue import WaitingQueue
from server.preemption import victim
from tests.helpers import (LLAMA_TARGETS, decode_forced, left_for_the_collector, make_peft_adapter, scrape,
                           slow_decode, start_server, wait_for)
from tests.test_longrope import CROSSING, runner_for
from tests.test_longrope import MODELS as LONGROPE_MODELS


def request(adapter: str, name: str, arrival: float = 0.0) -> EngineRequest:
    return EngineRequest(name, [1, 2, 3], SimpleNamespace(adapter_id=adapter) if adapter else None, None, None,
                         sink=lambda event: None, arrival=arrival)


def row(adapter: str, name: str, generated: int, arrival: float = 0.0):
    return SimpleNamespace(state=SimpleNamespace(request=request(adapter, name, arrival),
                                                 stream=SimpleNamespace(ids=[7] * generated)))


def chosen(rows, waiting: list[EngineRequest], max_rows: int = 4, fits=lambda request, leaving: True,
           resumable=lambda row: True) -> str | None:
    queue = WaitingQueue(fair=True)
    for r in waiting:
        queue.append(r)
    row = victim(queue, rows, rows, max_rows, fits, resumable)
    return None if row is None else row.state.request.request_id


def test_the_adapter_most_above_its_share_gives_its_newest_work_back():
    rows = [row("a", "a0", 9, 0.0), row("a", "a1", 2, 1.0), row("a", "a2", 2, 2.0), row("", "base", 1)]
    # three tenants share 4 rows: 1 each; "a" holds 3. Its row with the fewest tokens goes, the latest arrival first
    assert chosen(rows, [request("b", "b0")]) == "a2"
    rows = [row("a", "a0", 3, 0.0), row("a", "a1", 3, 1.0),
            row("b", "b0", 3, 0.0), row("b", "b1", 3, 1.0), row("b", "b2", 4, 2.0)]
    assert chosen(rows, [request("c", "c0")], max_rows=5) == "b1"  # share 5 // 3 = 1: b holds the most
    assert chosen(rows, [request("a", "a2")], max_rows=5) is None  # share 5 // 2 = 2: a holds its 2


def test_no_preemption_with_a_row_free_for_the_next_at_its_share_or_for_a_request_that_would_wait_anyway():
    rows = [row("a", "a0", 3, 0.0), row("a", "a1", 3, 1.0), row("a", "a2", 4, 2.0), row("b", "b0", 3)]
    assert chosen(rows[:3], [request("c", "c0")]) is None  # a free row: admission gives it out
    assert chosen(rows, [request("c", "c0")]) == "a1"  # share 4 // 3 = 1: c holds none, a holds 3
    assert chosen(rows, [request("b", "b1")]) == "a1"  # share 4 // 2 = 2: b holds 1, a holds 3
    assert chosen(rows, [request("c", "c0")], fits=lambda request, leaving: False) is None  # no slot or KV room
    # a row that could not resume as it runs (Engine._resumable) is passed over; with none left, nobody goes
    assert chosen(rows, [request("c", "c0")], resumable=lambda r: r.state.request.request_id != "a1") == "a0"
    assert chosen(rows, [request("c", "c0")], resumable=lambda r: False) is None
    # the next in fair order is "a", at or above its share: nobody is preempted for the requests behind it either
    assert chosen(rows, [request("a", "a3"), request("c", "c0")]) is None
    # equal shares: nobody is above
    even = [row("a", "a0", 3), row("a", "a1", 3), row("b", "b0", 3), row("b", "b1", 3)]
    assert chosen(even, [request("b", "b2")]) is None


@pytest.fixture(scope="module")
def longrope_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt-longrope")
    return {name: build_model_dir(root / name, LONGROPE_MODELS[name][0], seed=5, **LONGROPE_MODELS[name][1])
            for name in ("phi3", "llama-longrope")}


@pytest.mark.parametrize("name", ["phi3", "llama-longrope"])
def test_a_row_is_preempted_only_where_a_prefill_of_its_tokens_gives_the_keys_it_holds(longrope_models, name):
    """A LongRoPE row that passed the original length from a prompt within it: phi3 recomputes its keys with the long
    factors then (as HF does), so one prefill of its tokens gives what it holds; a family that keeps its cache holds
    short-factor keys before long ones, which no prefill gives: such a row is never preempted."""
    runner = runner_for(longrope_models[name])
    logits, fed = decode_forced(runner, [Row(list(CROSSING), 0)], steps=6)  # 29 tokens + 6 > 32, the original length
    generated = fed[0].tolist()
    _, resumed = runner.prefill([Row(CROSSING + generated, 0)])
    assert torch.allclose(resumed[0], logits[0, 6], atol=1e-4, rtol=0) == (name == "phi3")

    def resumable(prompt, generated, prefilled=None):
        state = SimpleNamespace(request=SimpleNamespace(prompt_ids=prompt), stream=SimpleNamespace(ids=generated))
        return Engine._resumable(SimpleNamespace(runner=runner), Row(prefilled or prompt, 0, state))
    assert resumable(CROSSING, generated) == (name == "phi3")
    assert resumable(CROSSING, generated[:2])  # within the original length: short factors, as a prefill gives
    assert resumable(CROSSING, generated, prefilled=CROSSING + generated[:4])  # resumed past it: all long


# -- through the server ------------------------------------------------------------------------------------------

# 20 tokens each: a block of the prefix cache and some (of equal length: whether they are prefilled together or apart,
# each copies its block whole)
FLOOD = [[5, 9, 14, 3] * 5, [8, 2, 11, 6] * 5]
OTHER = [4, 4, 6, 7]


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    for i, name in enumerate(("flood", "other", "b")):
        make_peft_adapter(model_dirs["llama"], root / name, 20 + i, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    return root


def metric(server, name: str, adapter: str | None = None) -> float:
    return scrape(server).get(f'{name}{{adapter="{adapter}"}}' if adapter else name, 0.0)


def joined(messages: list) -> SimpleNamespace:
    """A stream's messages as one reply: tokens, text, log-probabilities, finish reason and usage."""
    return SimpleNamespace(tokens=[t for m in messages for t in m.token_ids], text="".join(m.text for m in messages),
                           logprobs=[p for m in messages for p in m.logprobs], finish=messages[-1].finish_reason,
                           usage=messages[-1].usage)


async def contest(server, other_tokens: int, during=None, **flood) -> tuple[list, object, list[str]]:
    """Two 'flood' streams fill the batch's two rows; once each has 3 tokens, an 'other' request comes (and then
    `during(server)` runs in a thread). The flood's replies (`joined`), the other's, and the order they ended."""
    ended, seen = [], [0, 0]
    async with AsyncClient(server.target, timeout=60) as client:
        async def stream(i: int):
            messages = []
            async for message in client.generate_stream(FLOOD[i], "flood", **{"ignore_eos": True, **flood}):
                messages.append(message)
                seen[i] += len(message.token_ids)
            ended.append(f"flood{i}")
            return joined(messages)
        streams = [asyncio.create_task(stream(i)) for i in range(2)]
        assert await asyncio.to_thread(wait_for, lambda: min(seen) >= 3, 30)
        other = asyncio.create_task(client.generate(OTHER, "other", max_new_tokens=other_tokens, ignore_eos=True))
        if during is not None:
            await asyncio.to_thread(during, server)
        other = await other
        ended.append("other")
        return await asyncio.gather(*streams), other, ended


@pytest.mark.parametrize("prefix_cache", [0, 256])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_preempted_request_resumes_with_the_tokens_it_gives_alone(model_dirs, adapters, monkeypatch, prefix_cache,
                                                                    sampled):
    flood = dict(max_new_tokens=40, **(dict(temperature=0.9, seed=11) if sampled else {}))
    server = start_server(model_dirs["llama"], adapters, max_batch_size=2, prefix_cache_tokens=prefix_cache)
    try:
        with Client(server.target, timeout=60) as client:
            alone = [list(client.generate(p, "flood", ignore_eos=True, **flood).token_ids) for p in FLOOD]
            other_alone = list(client.generate(OTHER, "other", max_new_tokens=4, ignore_eos=True).token_ids)
        before = scrape(server)
        slow_decode(server, monkeypatch, 0.02)
        results, other, ended = asyncio.run(contest(server, 4, **flood))
        after = scrape(server)
    finally:
        server.stop()
    assert ended[0] == "other"  # it did not wait 40 steps for a flood row to end
    assert [r.tokens for r in results] == alone and list(other.token_ids) == other_alone
    assert [(r.usage.prompt_tokens, r.usage.completion_tokens) for r in results] == [(len(p), 40) for p in FLOOD]
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta['loraplex_requests_preempted_total{adapter="flood"}'] == 1
    assert delta["loraplex_time_to_first_token_seconds_count"] == 3  # the resumed request's next token is no first
    assert delta["loraplex_prompt_tokens_total"] == len(FLOOD[0]) + len(FLOOD[1]) + len(OTHER)
    # its prompt and the tokens it had (at least 3) ran again, or were copied: the prefix cache kept them when it left
    resumed = delta["loraplex_resumed_tokens_total"]
    assert min(map(len, FLOOD)) + 3 <= resumed < max(map(len, FLOOD)) + 40
    # (with a prefix cache, the flood's prompts come from the runs alone; a prefill runs at least its last token)
    copied = sum((n - 1) // 16 * 16 for n in [*map(len, FLOOD), resumed])
    assert delta["loraplex_prompt_tokens_copied_total"] == (copied if prefix_cache else 0)


def test_with_no_preemption_or_fifo_the_batch_runs_its_requests_out(model_dirs, adapters, monkeypatch):
    for settings in (dict(preemption=False), dict(scheduling="fifo")):
        server = start_server(model_dirs["llama"], adapters, max_batch_size=2, **settings)
        try:
            slow_decode(server, monkeypatch, 0.02)
            _, _, ended = asyncio.run(contest(server, 4, max_new_tokens=30))
            assert ended[0].startswith("flood") and metric(server, "loraplex_requests_preempted_total", "flood") == 0
            with Client(server.target, timeout=60) as client:
                assert not client.server_info().preemption
        finally:
            server.stop()


def test_a_preempted_request_is_not_ended_by_a_drain(model_dirs, adapters, monkeypatch):
    """Draining ends the requests that wait for a row and never started (they retry elsewhere at once); a preempted
    one started, so it waits on, resumes and ends as it would have."""
    server = start_server(model_dirs["llama"], adapters, max_batch_size=2)
    try:
        with Client(server.target, timeout=60) as client:
            assert client.server_info().preemption
            alone = [list(client.generate(p, "flood", max_new_tokens=30, ignore_eos=True).token_ids) for p in FLOOD]
        slow_decode(server, monkeypatch, 0.02)

        def drain(server):
            assert wait_for(lambda: metric(server, "loraplex_requests_preempted_total", "flood") == 1, 30)
            assert metric(server, "loraplex_num_requests_waiting") == 1  # the preempted request
            server.serving.engine.drain(Unavailable("draining")).result(timeout=30)
        results, other, ended = asyncio.run(contest(server, 10, drain, max_new_tokens=30))
    finally:
        server.stop()
    assert [r.tokens for r in results] == alone and len(other.token_ids) == 10


def test_a_preempted_request_with_a_chunked_prefill_penalties_and_a_min_length_resumes_as_it_runs_alone(
        model_dirs, adapters, monkeypatch):
    flood = dict(max_new_tokens=30, temperature=0.9, seed=3, repetition_penalty=1.3, min_new_tokens=25)
    server = start_server(model_dirs["llama"], adapters, max_batch_size=2, max_prefill_tokens=8,
                          prefix_cache_tokens=256)
    try:
        with Client(server.target, timeout=60) as client:
            alone = [list(client.generate(p, "flood", ignore_eos=True, **flood).token_ids) for p in FLOOD]
        slow_decode(server, monkeypatch, 0.03)
        results, _, _ = asyncio.run(contest(server, 4, **flood))
        assert metric(server, "loraplex_requests_preempted_total", "flood") == 1
    finally:
        server.stop()
    assert [r.tokens for r in results] == alone


@pytest.mark.parametrize("prefix_cache", [0, 256])
def test_completions_scoring_their_prompt_resume_without_scoring_it_again(model_dirs, adapters, monkeypatch,
                                                                          prefix_cache):
    """n = 2 completions of a call scoring its prompt fill the batch; one is preempted: its tokens, the prompt's
    scores (sent once) and the usage are those of the call alone."""
    call = dict(n=2, prompt_logprobs=2, logprobs=1, max_new_tokens=30, ignore_eos=True, temperature=0.9, seed=5)
    server = start_server(model_dirs["llama"], adapters, max_batch_size=2, prefix_cache_tokens=prefix_cache)
    try:
        with Client(server.target, timeout=60) as client:
            alone = client.generate(FLOOD[0], "flood", **call)
            slow_decode(server, monkeypatch, 0.03)
            before = scrape(server)["loraplex_generation_tokens_total"]
            flood = {}
            thread = threading.Thread(target=lambda: flood.setdefault("reply", client.generate(FLOOD[0], "flood",
                                                                                                **call)))
            thread.start()
            assert wait_for(lambda: scrape(server)["loraplex_generation_tokens_total"] - before >= 8, 30)
            client.generate(OTHER, "other", max_new_tokens=4, ignore_eos=True)
            thread.join(60)
            assert metric(server, "loraplex_requests_preempted_total", "flood") == 1
    finally:
        server.stop()
    got = flood["reply"]
    assert [list(c.token_ids) for c in got.completions] == [list(c.token_ids) for c in alone.completions]
    assert list(got.prompt_logprobs) == list(alone.prompt_logprobs)
    for mine, theirs in zip(got.completions, alone.completions):  # (other rows beside them: within rounding)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(mine.logprobs, theirs.logprobs)) < 1e-4
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(FLOOD[0]), 60)


def test_a_preempted_request_cancelled_while_it_waits_leaves_nothing_behind(model_dirs, adapters, monkeypatch):
    """No row, slot or count, and nothing for the cyclic collector: its state (kept to resume) and the request
    referred to each other, which kept both, and the adapter's weights once unloaded, until the collector ran."""
    server = start_server(model_dirs["llama"], adapters, max_batch_size=2)
    engine = server.serving.engine
    streams, seen, ended = {}, [0, 0], {}

    def flood(i: int):
        with Client(server.target, timeout=60) as client:
            streams[i] = client.generate_stream(FLOOD[i], "flood", max_new_tokens=40, ignore_eos=True)
            try:
                for message in streams[i]:
                    seen[i] += len(message.token_ids)
                ended[i] = "finished"
            except grpc.RpcError as exc:
                ended[i] = exc.code()

    def workload() -> int:
        threads = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: min(seen) >= 3, 30)
        with Client(server.target, timeout=60) as client:
            other = client.generate_stream(OTHER, "other", max_new_tokens=20, ignore_eos=True)
            assert wait_for(lambda: any(r.resume is not None for r in engine._waiting), 30)
            preempted = FLOOD.index(next(r for r in engine._waiting if r.resume is not None).prompt_ids)
            streams[preempted].cancel()
            assert wait_for(lambda: not engine._waiting, 10)
            assert sum(len(m.token_ids) for m in other) == 20
        for thread in threads:
            thread.join(60)
        assert wait_for(engine.idle, 10)
        with Client(server.target, timeout=60) as client:
            client.unload_adapter("flood")
        return preempted
    try:
        slow_decode(server, monkeypatch, 0.03)
        preempted, left = left_for_the_collector(workload)
        metrics = scrape(server)
    finally:
        server.stop()
    assert left == 0, f"{left} tensors waited for the cyclic collector"
    assert ended == {0: "finished", 1: "finished"}  # (the client's own cancel ends its stream quietly)
    assert seen[preempted] < 40 and seen[1 - preempted] == 40
    assert metrics['loraplex_request_success_total{finished_reason="cancelled"}'] == 1
    assert (metrics["loraplex_num_requests_waiting"], metrics["loraplex_num_requests_running"],
            metrics["loraplex_adapter_slots_used"], engine._pending.total) == (0, 0, 0, 0)


def hold_engine(server):
    """Hold the engine between two steps until the returned function is called."""
    gate, held = threading.Event(), threading.Event()
    server.serving.engine.call(lambda: (held.set(), gate.wait(30)))
    assert held.wait(30)
    return gate.set


@pytest.mark.parametrize("limit", ["slot", "kv"])
def test_a_row_is_preempted_only_for_a_request_that_will_take_it(model_dirs, adapters, monkeypatch, limit):
    """Four 'flood' rows fill the batch; 'other' and 'b' arrive together, each below its share (1 of 4 rows). Room
    for one only, whose row is the one preempted: one device slot left idle (slot), or KV room beside the flood's
    rows for 'other' and then not for 'b' as well (kv: 4 x 80 token slots, within 400, then 4 x 120)."""
    settings = dict(max_active_adapters=2) if limit == "slot" else dict(max_kv_tokens=400)
    server = start_server(model_dirs["llama"], adapters, max_batch_size=4, **settings)
    engine = server.serving.engine
    try:
        with Client(server.target, timeout=60) as client:  # every adapter read once
            for name in ("flood", "other", "b"):
                client.generate(OTHER, name, max_new_tokens=1)
        slow_decode(server, monkeypatch, 0.03)
        done = {}

        def generate(key, prompt, adapter, tokens):
            with Client(server.target, timeout=120) as client:
                done[key] = client.generate(prompt, adapter, max_new_tokens=tokens, ignore_eos=True)
        threads = [threading.Thread(target=generate, args=(i, FLOOD[i % 2], "flood", 80 - len(FLOOD[i % 2])))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: metric(server, "loraplex_num_requests_running") == 4, 30)
        release = hold_engine(server)
        for adapter, tokens in (("other", 76), ("b", 116)):  # 'other' first in turn
            threads.append(threading.Thread(target=generate, args=(adapter, OTHER, adapter, tokens)))
            threads[-1].start()
            assert wait_for(lambda: engine.pending_for(adapter) == 1, 20)
        release()
        time.sleep(0.5)  # ~15 steps
        state = (metric(server, "loraplex_requests_preempted_total", "flood"),
                 metric(server, "loraplex_num_requests_running"), metric(server, "loraplex_num_requests_waiting"))
        for thread in threads:
            thread.join(120)
    finally:
        server.stop()
    assert state == (1, 4, 2)  # 'b' and the preempted request wait; no row is empty
    assert len(done) == 6 and len(done["b"].token_ids) == 116


@pytest.mark.parametrize("held", ["format", "stop"])
def test_a_preempted_request_keeps_its_response_format_stop_sequences_and_log_probabilities(model_dirs, adapters,
                                                                                            monkeypatch, held):
    """Sampled, with log-probabilities: its output held to a regex, or cut by a stop string that spans the preemption
    (characters 2-14 of its text alone: the preemption comes after 3 tokens or more)."""
    flood = dict(max_new_tokens=30, temperature=1.0, seed=5, logprobs=3)
    server = start_server(model_dirs["llama"], adapters, max_batch_size=2)
    try:
        with Client(server.target, timeout=60) as client:
            if held == "format":  # (30 tokens cannot complete it: no end of sequence before them)
                flood.update(regex="([a-z]+ ){60}", ignore_eos=False)
            else:
                flood.update(ignore_eos=True)
                flood["stop"] = [client.generate(p, "flood", **flood).text[2:14] for p in FLOOD]
            alone = [joined(list(client.generate_stream(p, "flood", **flood))) for p in FLOOD]
        slow_decode(server, monkeypatch, 0.03)
        results, _, _ = asyncio.run(contest(server, 4, **flood))
        assert metric(server, "loraplex_requests_preempted_total", "flood") == 1
    finally:
        server.stop()
    assert [(r.tokens, r.text, r.finish) for r in results] == [(a.tokens, a.text, a.finish) for a in alone]
    ended = pb.FINISH_REASON_LENGTH if held == "format" else pb.FINISH_REASON_STOP_SEQUENCE
    assert {r.finish for r in results} == {ended}
    for mine, theirs in zip(results, alone):
        assert [list(p.top_token_ids) for p in mine.logprobs] == [list(p.top_token_ids) for p in theirs.logprobs]
        assert max(abs(p.logprob - q.logprob) for p, q in zip(mine.logprobs, theirs.logprobs)) < 1e-4


def test_a_request_preempted_across_a_hot_swap_resumes_on_the_version_it_started_with(model_dirs, adapters,
                                                                                     monkeypatch, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(adapters, root)
    server = start_server(model_dirs["llama"], root, max_batch_size=2, max_active_adapters=2)
    engine = server.serving.engine
    try:
        with Client(server.target, timeout=60) as client:
            alone = [list(client.generate(p, "flood", max_new_tokens=40, ignore_eos=True).token_ids) for p in FLOOD]
        slow_decode(server, monkeypatch, 0.03)

        def swap(server):
            assert wait_for(lambda: any(r.resume is not None for r in engine._waiting), 30)
            shutil.rmtree(root / "flood")
            make_peft_adapter(model_dirs["llama"], root / "flood", 99, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
            with Client(server.target, timeout=60) as client:
                assert client.load_adapter("flood", replace=True).version == 2
        results, _, _ = asyncio.run(contest(server, 10, swap, max_new_tokens=40))
        with Client(server.target, timeout=60) as client:
            new = [list(client.generate(p, "flood", max_new_tokens=40, ignore_eos=True).token_ids) for p in FLOOD]
        assert wait_for(engine.idle, 10)
        metrics = scrape(server)
    finally:
        server.stop()
    assert [r.tokens for r in results] == alone and new != alone
    assert (metrics["loraplex_num_requests_waiting"], metrics["loraplex_num_requests_running"],
            metrics["loraplex_adapter_slots_used"]) == (0, 0, 0)

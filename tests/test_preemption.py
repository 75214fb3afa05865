"""--scheduling fair preempts: with every row taken, a request of an adapter below its share of the rows gets one from
the adapter holding the most above its share; the preempted request waits first among its adapter's and resumes where
it stopped, giving exactly the tokens it gives uninterrupted. The policy alone, then through the real server."""
import asyncio
from types import SimpleNamespace

import pytest

from clients.client import AsyncClient, Client
from server.engine_messages import EngineRequest
from server.errors import Unavailable
from server.fair_queue import WaitingQueue
from server.preemption import victims
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, slow_decode, start_server, wait_for


def request(adapter: str, name: str, arrival: float = 0.0) -> EngineRequest:
    return EngineRequest(name, [1, 2, 3], SimpleNamespace(adapter_id=adapter) if adapter else None, None, None,
                         sink=lambda event: None, arrival=arrival)


def row(adapter: str, name: str, generated: int, arrival: float = 0.0):
    return SimpleNamespace(state=SimpleNamespace(request=request(adapter, name, arrival),
                                                 stream=SimpleNamespace(ids=[7] * generated)))


def chosen(rows, waiting: list[EngineRequest], max_rows: int = 4, fits=lambda request, leaving: True) -> list[str]:
    queue = WaitingQueue(fair=True)
    for r in waiting:
        queue.append(r)
    return [r.state.request.request_id for r in victims(queue, rows, rows, max_rows, fits)]


def test_the_adapter_most_above_its_share_gives_its_newest_work_back():
    rows = [row("a", "a0", 9, 0.0), row("a", "a1", 2, 1.0), row("a", "a2", 2, 2.0), row("", "base", 1)]
    # three tenants share 4 rows: 1 each; "a" holds 3. Its rows with the fewest tokens go, the latest arrival first
    assert chosen(rows, [request("b", "b0")]) == ["a2"]
    assert chosen(rows, [request("b", "b0"), request("b", "b1")]) == ["a2"]  # b at its share after one
    # two tenants waiting: 4 tenants, share 1; "a" gives two of its three rows
    assert chosen(rows, [request("b", "b0"), request("c", "c0")]) == ["a2", "a1"]


def test_no_preemption_with_a_row_free_for_the_next_at_its_share_or_for_a_request_that_would_wait_anyway():
    rows = [row("a", "a0", 3, 0.0), row("a", "a1", 3, 1.0), row("a", "a2", 4, 2.0), row("b", "b0", 3)]
    assert chosen(rows[:3], [request("c", "c0")]) == []  # a free row: admission gives it out
    assert chosen(rows, [request("c", "c0")]) == ["a1"]  # share 4 // 3 = 1: c holds none, a holds 3
    assert chosen(rows, [request("b", "b1")]) == ["a1"]  # share 4 // 2 = 2: b holds 1, a holds 3
    assert chosen(rows, [request("c", "c0")], fits=lambda request, leaving: False) == []  # no slot or KV room for it
    # the next in fair order is "a", at or above its share: nobody is preempted for the requests behind it either
    assert chosen(rows, [request("a", "a3"), request("c", "c0")]) == []
    # equal shares: nobody is above
    even = [row("a", "a0", 3), row("a", "a1", 3), row("b", "b0", 3), row("b", "b1", 3)]
    assert chosen(even, [request("b", "b2")]) == []


# -- through the server ------------------------------------------------------------------------------------------

FLOOD = [[5, 9, 14, 3] * 5, [8, 2, 11] * 6]  # 20 and 18 tokens: a block of the prefix cache each, and some
OTHER = [4, 4, 6, 7]


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    for i, name in enumerate(("flood", "other")):
        make_peft_adapter(model_dirs["llama"], root / name, 20 + i, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    return root


def metric(server, name: str, adapter: str | None = None) -> float:
    return scrape(server).get(f'{name}{{adapter="{adapter}"}}' if adapter else name, 0.0)


async def contest(server, other_tokens: int, during=None, **flood) -> tuple[list, object, list[str]]:
    """Two 'flood' streams fill the batch's two rows; once each has 3 tokens, an 'other' request comes (and then
    `during(server)` runs in a thread). The flood's (tokens, usage), the other's response, and the order they ended."""
    ended, seen = [], [0, 0]
    async with AsyncClient(server.target, timeout=60) as client:
        async def stream(i: int):
            tokens, usage = [], None
            async for message in client.generate_stream(FLOOD[i], "flood", ignore_eos=True, **flood):
                tokens.extend(message.token_ids)
                seen[i] = len(tokens)
                usage = message.usage if message.HasField("usage") else usage
            ended.append(f"flood{i}")
            return tokens, usage
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
    assert [tokens for tokens, _ in results] == alone and list(other.token_ids) == other_alone
    assert [(u.prompt_tokens, u.completion_tokens) for _, u in results] == [(len(p), 40) for p in FLOOD]
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
    assert [tokens for tokens, _ in results] == alone and len(other.token_ids) == 10

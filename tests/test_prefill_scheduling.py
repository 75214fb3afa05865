"""--max-prefill-tokens schedules prefills: a burst in groups within it, a longer prompt alone in chunks with decode
steps between them, shorter requests joining while it chunks, a second long prompt after the first, and nobody
starved for it."""
import asyncio
import time

from clients.client import AsyncClient, Client
from tests.helpers import make_peft_adapter, scrape, start_server, wait_for


def test_a_burst_is_prefilled_in_groups_within_max_prefill_tokens(model_dirs):
    """Requests queued together are prefilled in groups of at most --max-prefill-tokens padded tokens (a longer
    prompt alone, that many tokens at a time), oldest first, with a decode step for the running rows between two
    groups, and between two chunks of a long prompt."""
    import threading
    server = start_server(model_dirs["llama"], None, max_prefill_tokens=25)
    runner, engine = server.serving.engine.runner, server.serving.engine
    steps = []
    start, advance, decode_step = runner.start_prefill, runner.advance, runner.decode_step
    runner.start_prefill = lambda rows, *rest: (steps.append(("prefill", [len(r.prompt_ids) for r in rows])),
                                                start(rows, *rest))[1]
    runner.advance = lambda job, columns: (steps.append(("chunk", min(columns, job.length - job.done))),
                                           advance(job, columns))[1]
    runner.decode_step = lambda batch: (steps.append(("decode", len(batch))), decode_step(batch))[1]
    try:
        async def run():
            async with AsyncClient(server.target, timeout=120) as client:
                long = asyncio.create_task(client.generate([3, 4], max_new_tokens=60, ignore_eos=True))
                assert await asyncio.to_thread(wait_for, lambda: ("decode", 1) in steps)
                gate = threading.Event()
                engine.call(lambda: gate.wait(30))  # holds the engine between steps while the burst queues
                prompts = [list(range(5 + i, 15 + i)) for i in range(5)] + [list(range(5, 45))]
                burst = []
                for queued, p in enumerate(prompts, 1):  # one at a time: requests sent together queue in any order
                    burst.append(asyncio.create_task(client.generate(p, max_new_tokens=3, ignore_eos=True)))
                    assert await asyncio.to_thread(
                        wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == queued)
                gate.set()
                return await long, await asyncio.gather(*burst)
        long, burst = asyncio.run(run())
        assert len(long.token_ids) == 60 and [len(r.token_ids) for r in burst] == [3] * 6
    finally:
        server.stop()
    groups = [(i, lengths) for i, (kind, lengths) in enumerate(steps) if kind == "prefill"][1:]  # the burst's
    assert [lengths for _, lengths in groups] == [[10, 10], [10, 10], [10], [40]]  # 3 x 10 > 25; 40 alone
    for (i, _), (j, _) in zip(groups, groups[1:]):  # the running rows got a token between two groups
        assert any(kind == "decode" for kind, _ in steps[i + 1:j]), steps
    last = steps[groups[-1][0] + 1:]
    chunks = [i for i, (kind, _) in enumerate(last) if kind == "chunk"]
    assert [last[i][1] for i in chunks] == [25, 15]  # the 40-token prompt in two chunks, a token for the rows between
    assert any(kind == "decode" for kind, _ in last[chunks[0] + 1:chunks[1]]), steps


def test_a_long_prompt_prefilled_in_chunks_gives_its_tokens_and_a_cancel_stops_its_chunks(model_dirs):
    """A prompt above --max-prefill-tokens runs that many tokens an iteration: it gets the tokens it gets in one
    pass, and cancelled between two chunks it runs no more of them (its slot and counters as for any cancel)."""
    prompt = [(11 * i) % 250 + 3 for i in range(90)]
    whole = start_server(model_dirs["llama"], None)
    try:
        with Client(whole.target, timeout=60) as client:
            want = list(client.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids)
    finally:
        whole.stop()
    server = start_server(model_dirs["llama"], None, max_prefill_tokens=8)
    runner = server.serving.engine.runner
    chunks = []
    advance = runner.advance

    def slow(job, columns):  # 12 chunks of 8 columns (the last 2): slow enough to cancel between two
        chunks.append(job.length)
        time.sleep(0.08)
        return advance(job, columns)
    runner.advance = slow
    try:
        with Client(server.target, timeout=60) as client:
            assert list(client.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids) == want
            assert chunks == [90] * 12
            chunks.clear()
            before = scrape(server).get('loraplex_request_success_total{finished_reason="cancelled"}', 0)
            stream = client.generate_stream(prompt, max_new_tokens=6, ignore_eos=True)
            assert wait_for(lambda: len(chunks) >= 2)
            stream.cancel()
            assert wait_for(lambda: scrape(server).get(
                'loraplex_request_success_total{finished_reason="cancelled"}', 0) == before + 1)
            ran = len(chunks)
            time.sleep(0.3)
            assert len(chunks) == ran < 12
            metrics = scrape(server)
            assert metrics["loraplex_num_requests_running"] == 0 and metrics["loraplex_kv_cache_bytes"] == 0
            assert list(client.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids) == want
            short = [5, 6, 7]
            short_alone = list(client.generate(short, max_new_tokens=3, ignore_eos=True).token_ids)

        async def short_during_long():  # a request that one prefill runs whole joins while the long one chunks
            async with AsyncClient(server.target, timeout=60) as client:
                done = {}

                async def long_stream():
                    tokens = []
                    async for message in client.generate_stream(prompt, max_new_tokens=6, ignore_eos=True):
                        done.setdefault("long's first token", time.monotonic())
                        tokens += message.token_ids
                    return tokens
                chunks.clear()
                long = asyncio.create_task(long_stream())
                assert await asyncio.to_thread(wait_for, lambda: len(chunks) >= 2)
                quick = list((await client.generate(short, max_new_tokens=3, ignore_eos=True)).token_ids)
                done["short"] = time.monotonic()
                return await long, quick, done
        long_tokens, short_tokens, done = asyncio.run(short_during_long())
        assert (long_tokens, short_tokens) == (want, short_alone)
        assert done["short"] < done["long's first token"]  # it did not wait for the long prompt's last chunk
    finally:
        server.stop()


def test_short_requests_pass_a_second_long_prompt_while_the_first_chunks(model_dirs):
    """One long prompt chunks at a time; a second waits for its last chunk, then goes first. A short request behind
    the second used to wait for both (oldest first); it now joins while the first chunks, with the tokens it gets
    alone, and the second long prompt still gets its own."""
    first, second = ([(k * i) % 250 + 3 for i in range(90)] for k in (11, 13))
    short = [5, 6, 7]
    server = start_server(model_dirs["llama"], None, max_prefill_tokens=8)
    runner = server.serving.engine.runner
    chunks, advance = [], runner.advance

    def slow(job, columns):  # the 90-token prompts take 12 chunks of 8: slow enough to queue behind them
        chunks.append(job.length)
        time.sleep(0.05)
        return advance(job, columns)
    try:
        with Client(server.target, timeout=60) as client:
            alone = {name: list(client.generate(p, max_new_tokens=4, ignore_eos=True).token_ids)
                     for name, p in (("first", first), ("second", second), ("short", short))}
        runner.advance = slow

        async def run():
            async with AsyncClient(server.target, timeout=60) as client:
                done = {}

                async def timed(name, prompt):
                    reply = await client.generate(prompt, max_new_tokens=4, ignore_eos=True)
                    done[name] = time.monotonic()
                    return list(reply.token_ids)
                tasks = {"first": asyncio.create_task(timed("first", first))}
                assert await asyncio.to_thread(wait_for, lambda: len(chunks) >= 2)
                tasks["second"] = asyncio.create_task(timed("second", second))
                assert await asyncio.to_thread(
                    wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == 1)
                tasks["short"] = asyncio.create_task(timed("short", short))
                return {name: await task for name, task in tasks.items()}, done
        got, done = asyncio.run(run())
        assert got == alone
        assert done["short"] < done["first"] < done["second"]
        assert chunks.count(90) == 24  # each long prompt in 12 chunks, one after the other
    finally:
        server.stop()


def test_a_long_prompt_waiting_for_a_slot_is_not_starved_while_other_long_prompts_chunk(model_dirs, tmp_path):
    """One slot, held by steady traffic on adapter a; a long prompt on adapter b; base-model long prompts keep
    chunking. Deferred behind each chunking prompt, b's request let a's rows take the slot again and again (found by
    a soak: still waiting after 30 s; served in 0.05 s before, and now). A server process of its own: in this one the
    clients' pace, under the server's GIL, let the slot drain."""
    from bench.server_process import ServerProcess
    for name, seed in (("a", 1), ("b", 2)):
        make_peft_adapter(model_dirs["llama"], tmp_path / name, seed, r=4, lora_alpha=8, target_modules=["q_proj"])
    server = ServerProcess(["--model", model_dirs["llama"], "--adapter-root", tmp_path, "--max-active-adapters", 1,
                            "--max-prefill-tokens", 32, "--max-batch-size", 8, "--threads", 2, "--log-level", "WARNING",
                            "--state-file", tmp_path / "state.json"])
    try:
        async def run():
            async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as client:
                stop = asyncio.Event()

                async def steady(prompt, adapter, new):
                    while not stop.is_set():
                        await client.generate(prompt, adapter, max_new_tokens=new, ignore_eos=True)
                workers = [asyncio.create_task(steady([10 + k] * 10, "a", 16)) for k in range(4)] + \
                    [asyncio.create_task(steady([20 + k] * 120, "", 1)) for k in range(2)]
                await asyncio.sleep(3)
                start = time.monotonic()
                try:
                    reply = await asyncio.wait_for(client.generate([30] * 120, "b", max_new_tokens=1), 15)
                finally:
                    stop.set()
                    await asyncio.gather(*workers, return_exceptions=True)
                return reply, time.monotonic() - start
        reply, waited = asyncio.run(run())
        assert len(reply.token_ids) == 1 and waited < 15
    finally:
        server.stop()

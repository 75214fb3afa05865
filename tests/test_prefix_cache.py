"""The prefix cache (--prefix-cache-tokens): a prompt starting with blocks that earlier requests of its adapter version
ran (their prompts, and what they generated) copies those blocks' keys and values and runs the rest; every row's
logits, and its tokens after, are those it gets with nothing cached."""
import concurrent.futures
import re
import threading

import grpc
import pytest
import torch

from clients.client import Client
from loader.default_model import build_model_dir
from server.batch import Row
from server.config import ConfigError, ServerConfig, check_config
from server.prefix_cache import BLOCK, PrefixCache
from server.prompt_sharing import cached_prefix
from tests.helpers import (LLAMA_TARGETS, decode_forced, decode_from, make_peft_adapter, random_lora_runner, scrape,
                           start_server, wait_for)
from tests.test_shared_prefill import MODELS

LAYOUT = [(torch.Size([2, 1, 3]), torch.Size([2, 1, 5]), torch.float32), None]  # a layer keeping none: Gemma-3n


def kv_of(tokens: list[int]):
    """Keys and values that name their token and place: [heads, len, dim]."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, :, None]
    return [(t + torch.arange(2.)[:, None, None] / 10 + torch.arange(3.) / 100,
             -t - torch.arange(2.)[:, None, None] / 10 - torch.arange(5.) / 100), None]


def test_blocks_are_keyed_by_adapter_and_every_token_before_them():
    cache = PrefixCache(8 * BLOCK, LAYOUT, torch.device("cpu"))
    a = list(range(100, 140))  # two whole blocks and 8 tokens
    assert cache.store(("x", 1), a, kv_of(a)) == 2 and cache.tokens == 2 * BLOCK
    assert cache.store(("x", 1), a + [7] * 30, kv_of(a + [7] * 30)) == 2  # the first two only touched
    blocks = cache.match(("x", 1), a)
    assert len(blocks) == 2
    k, v = cache.gather(blocks, 20)[0]
    torch.testing.assert_close(k, kv_of(a)[0][0][:, :20], atol=0, rtol=0)
    torch.testing.assert_close(v, kv_of(a)[0][1][:, :20], atol=0, rtol=0)
    assert cache.gather(blocks, 20)[1] is None
    assert cache.match(("x", 2), a) == [] and cache.match(None, a) == []  # another adapter version, the base model
    assert len(cache.match(("x", 1), a[:BLOCK + 1])) == 1  # a prompt's last token always runs: its logits
    assert len(cache.match(("x", 1), a[:BLOCK])) == 0
    assert len(cache.match(("x", 1), a[:BLOCK] + [0] + a[BLOCK + 1:])) == 1  # the second block follows another
    assert len(cache.match(("x", 1), [0] + a[1:])) == 0  # ... and so does everything after a change


def test_the_least_recently_used_sequence_loses_its_last_blocks_first():
    cache = PrefixCache(4 * BLOCK, LAYOUT, torch.device("cpu"))
    a, b = list(range(3 * BLOCK)), list(range(500, 500 + 2 * BLOCK))
    cache.store(None, a, kv_of(a))
    held = cache.match(None, a + [1])
    assert cache.store(None, b, kv_of(b)) == 2  # one block free: a's last goes, not its first
    assert len(cache.match(None, a + [1])) == 2 and len(cache.match(None, b + [1])) == 2
    with pytest.raises(RuntimeError, match="evicted"):
        cache.gather(held, 3 * BLOCK)
    k, _ = cache.gather(cache.match(None, b + [1]), 2 * BLOCK)[0]
    torch.testing.assert_close(k, kv_of(b)[0][0], atol=0, rtol=0)
    c = list(range(900, 900 + 10 * BLOCK))  # longer than the pools: its first four blocks
    assert cache.store(None, c, kv_of(c)) == 4 and len(cache.match(None, c)) == 4


@pytest.fixture(scope="module", params=list(MODELS))
def runner_and_slot(request, tmp_path_factory):
    arch, cfg = MODELS[request.param]
    return random_lora_runner(build_model_dir(tmp_path_factory.mktemp("prefix") / "m", arch, seed=3, **cfg))


def test_rows_whose_prompts_start_with_cached_blocks_decode_as_alone(runner_and_slot):
    runner, slot = runner_and_slot
    system = [(7 * i) % 250 + 5 for i in range(40)]  # two whole blocks and 8 tokens
    cache = PrefixCache(16 * BLOCK, runner.row_layout(), runner.device)
    ran, _ = runner.prefill([Row(system, slot)])
    cache.store(("a", 1), system, ran.cache.row(0, 0, len(system)))
    one, two, fresh = system + [60, 61, 62], system + list(range(70, 86)), list(range(90, 100))
    rows = [(one, slot), (two, slot), (fresh, slot), (one, slot), (fresh, 0)]
    forced = torch.tensor([[(11 * r + 3 * s) % 250 + 2 for s in range(3)] for r in range(len(rows))])
    alone = [decode_forced(runner, [Row(p, s)], forced=forced[i:i + 1], steps=3)[0][0]
             for i, (p, s) in enumerate(rows)]
    prefixes = {}
    for i, (prompt, s) in enumerate(rows):
        blocks = cache.match(("a", 1) if s else None, prompt)
        if blocks:
            prefixes[i] = cached_prefix(cache, blocks)
    assert sorted(prefixes) == [0, 1, 3]
    job = runner.start_prefill([Row(p, s) for p, s in rows], prefixes=prefixes)
    # rows right-aligned on 56 columns: `two` runs its last 24, so the first 32 are copied where a row has tokens
    assert job.done == 32 and job.copied == (32 - (56 - 43)) + 32
    logits = runner.advance(job, job.length)
    together, _ = decode_from(runner, runner.prefilled(job), logits, forced, steps=3)
    for i in range(len(rows)):
        torch.testing.assert_close(together[i], alone[i], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate("ab"):
        make_peft_adapter(model_dirs["llama"], root / name, seed + 3, r=8, lora_alpha=16,
                          target_modules=LLAMA_TARGETS)
    cached = start_server(model_dirs["llama"], root, prefix_cache_tokens=512)
    plain = start_server(model_dirs["llama"], root)
    yield cached, plain, root
    cached.stop()
    plain.stop()


def test_served_prompts_copy_what_earlier_requests_of_their_adapter_ran(servers, model_dirs):
    cached, plain, root = servers
    system = [(5 * i) % 200 + 9 for i in range(50)]
    first = system + [3, 4, 5, 6, 7]
    kwargs = dict(max_new_tokens=20, ignore_eos=True, logprobs=0)

    def both(prompt, adapter):
        """(the reply of the server with a prefix cache, the tokens it copied) after checking it against the other's"""
        before = scrape(cached)["loraplex_prompt_tokens_copied_total"]
        with Client(cached.target, timeout=60) as c, Client(plain.target, timeout=60) as p:
            got, want = c.generate(prompt, adapter, **kwargs), p.generate(prompt, adapter, **kwargs)
        assert list(got.token_ids) == list(want.token_ids)
        for g, w in zip(got.logprobs, want.logprobs):
            assert abs(g.logprob - w.logprob) < 1e-4
        return got, scrape(cached)["loraplex_prompt_tokens_copied_total"] - before

    reply, copied = both(first, "a")
    assert copied == 0
    assert both(system + [8, 9], "a")[1] == 3 * BLOCK  # the system prompt's whole blocks
    assert both(system + [8, 9], "b")[1] == 0  # another adapter's keys and values are its own
    assert both(system + [8, 9], "")[1] == 0
    # a chat's next turn: the first request's prompt and what it generated (all but its last token ran)
    assert both(first + list(reply.token_ids) + [10, 11], "a")[1] == (len(first) + 19) // BLOCK * BLOCK
    with Client(cached.target, timeout=60) as client:
        assert client.server_info().limits.prefix_cache_tokens == 512
        client.load_adapter("a", replace=True)  # the same files: the same keys and values
    assert both(system + [8, 9], "a")[1] == 3 * BLOCK
    with Client(cached.target, timeout=60) as client:
        client.unload_adapter("b")
        client.load_adapter("b")  # (review) the same files read again: a new read, the same weights and blocks
    assert both(system + [8, 9], "b")[1] == 3 * BLOCK
    make_peft_adapter(model_dirs["llama"], root / "a", 9, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    for server in servers[:2]:
        with Client(server.target, timeout=60) as client:
            client.load_adapter("a", replace=True)  # new weights: nothing the old ones ran is taken
    assert both(system + [8, 9], "a")[1] == 0
    assert scrape(cached)["loraplex_prefix_cache_tokens"] > 0
    with Client(plain.target, timeout=60) as client:
        assert client.server_info().limits.prefix_cache_tokens == 0


def test_a_prompt_scoring_its_tokens_copies_nothing(servers):
    cached, plain, _ = servers
    prompt = [(3 * i) % 200 + 9 for i in range(40)]
    with Client(cached.target, timeout=60) as c, Client(plain.target, timeout=60) as p:
        c.generate(prompt, "b", max_new_tokens=1)
        before = scrape(cached)["loraplex_prompt_tokens_copied_total"]
        got = c.generate(prompt, "b", max_new_tokens=1, prompt_logprobs=0)
        want = p.generate(prompt, "b", max_new_tokens=1, prompt_logprobs=0)
    assert scrape(cached)["loraplex_prompt_tokens_copied_total"] == before
    assert len(got.prompt_logprobs) == len(prompt) - 1
    for g, w in zip(got.prompt_logprobs, want.prompt_logprobs):
        assert abs(g.logprob - w.logprob) < 1e-4


@pytest.mark.parametrize("tokens, needle", [(5, "0 (no prefix cache) or at least 16"), (-1, ">= 0 (0: none)")])
def test_a_prefix_cache_smaller_than_a_block_is_refused(tokens, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_config(ServerConfig(prefix_cache_tokens=tokens))



def admitted_together(cached, plain, warm: list, requests: list, **kwargs) -> float:
    """Send `warm` (prompt, adapter) to the `cached` server one by one, then `requests` so that one admission takes
    them all (queued while its engine waits between two steps); each gets the `plain` server's tokens, and every slot
    is free after. Returns the prompt tokens `requests` copied."""
    with Client(plain.target, timeout=60) as client:
        want = [list(client.generate(p, a, **kwargs).token_ids) for p, a in requests]
    engine, gate = cached.serving.engine, threading.Event()
    with Client(cached.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        for prompt, adapter in warm:
            client.generate(prompt, adapter, max_new_tokens=1)
        before = scrape(cached)["loraplex_prompt_tokens_copied_total"]
        held = engine.call(gate.wait)
        replies = [pool.submit(client.generate, p, a, **kwargs) for p, a in requests]
        try:
            assert wait_for(lambda: scrape(cached)["loraplex_num_requests_waiting"] == len(requests), timeout=20)
        finally:
            gate.set()
        held.result()
        assert [list(f.result().token_ids) for f in replies] == want
    assert wait_for(lambda: engine.bank.used == 0)
    return scrape(cached)["loraplex_prompt_tokens_copied_total"] - before


def test_requests_admitted_together_take_their_own_prefixes(servers):
    """Rows of one prefill with prefixes of different lengths, of different adapters, or none: each gets what it
    gets with nothing cached."""
    system = [(11 * i) % 200 + 9 for i in range(70)]
    requests = [(system[:n] + [k + 1] * k, adapter) for k, (n, adapter) in
                enumerate([(70, "a"), (40, "a"), (70, "b"), (20, "a"), (70, ""), (70, "a"), (3, "b")])]
    warm = [(system, adapter) for adapter in ("a", "b", "")]
    assert admitted_together(*servers[:2], warm, requests, max_new_tokens=6, ignore_eos=True) > 0


def test_rows_copying_a_prefix_are_not_held_to_the_length_of_one_that_copies_none(servers):
    """(review) Beside a long prompt that copies nothing, right-aligned rows would run their cached tokens again: rows
    copying a prefix run in a prefill of their own when that runs fewer tokens."""
    system = [(13 * i) % 200 + 9 for i in range(70)]
    requests = [(system + [k + 1] * (k + 1), "a") for k in range(3)] + [([(3 * i) % 190 + 20 for i in range(90)], "a")]
    copied = admitted_together(*servers[:2], [(system, "a")], requests, max_new_tokens=5, ignore_eos=True)
    assert copied == 62 + 63 + 64  # 4 cached blocks each; right-aligned on 73 columns, the first 64 copied


def test_copies_of_a_prompt_prefill_with_its_cached_prefix(servers, model_dirs):
    """(review) A second request with an admitted prompt took no blocks: it ran the whole prompt apart, beyond
    --max-prefill-tokens, and that prefill was dropped after its first chunk (its requests never ended, their slot
    held)."""
    _, plain, root = servers
    budget = start_server(model_dirs["llama"], root, prefix_cache_tokens=512, max_prefill_tokens=64)
    system = [(17 * i) % 200 + 9 for i in range(70)]
    requests = [(system + [k + 1] * (k + 2), "a") for k in range(4)] + [(system + [50, 51], "a")] * 2
    try:
        copied = admitted_together(budget, plain, [(system, "a")], requests, max_new_tokens=4, ignore_eos=True)
    finally:
        budget.stop()
    assert copied == 61 + 62 + 63 + 64 + 61  # right-aligned on 75 columns, the first 64 (the copies' once)


def test_weights_read_from_files_replaced_meanwhile_take_no_blocks(servers, model_dirs, monkeypatch):
    """(review) The files' identity is taken before the read, which may wait: files replaced meanwhile (a deploy's
    link flipped) were read as the new weights under the old files' identity, and took the old weights' blocks."""
    cached, plain, root = servers
    make_peft_adapter(model_dirs["llama"], root / "c", 5, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    system = [(19 * i) % 200 + 9 for i in range(50)]
    with Client(cached.target, timeout=60) as client:
        client.generate(system, "c", max_new_tokens=1)
        client.unload_adapter("c")
    registry = cached.serving.registry
    read = registry._reader

    def replaced_before_the_read(*args):
        make_peft_adapter(model_dirs["llama"], root / "c", 6, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
        return read(*args)
    monkeypatch.setattr(registry, "_reader", replaced_before_the_read)
    before = scrape(cached)["loraplex_prompt_tokens_copied_total"]
    kwargs = dict(max_new_tokens=6, ignore_eos=True, logprobs=0)
    with Client(cached.target, timeout=60) as c, Client(plain.target, timeout=60) as p:
        got = c.generate(system + [8, 9], "c", **kwargs)
        want = p.generate(system + [8, 9], "c", **kwargs)  # (its first read of "c": the new files)
    assert scrape(cached)["loraplex_prompt_tokens_copied_total"] == before
    assert list(got.token_ids) == list(want.token_ids)
    for g, w in zip(got.logprobs, want.logprobs):
        assert abs(g.logprob - w.logprob) < 1e-4


def test_requests_share_cached_prompts_only_with_their_cache_salt(servers):
    """GenerateRequest.cache_salt: a tenant with a secret salt takes and leaves blocks only for its own requests (its
    time to first token tells nothing of what others sent); the salt changes nothing else."""
    cached, plain, _ = servers
    system = [(23 * i) % 200 + 9 for i in range(50)]
    kwargs = dict(max_new_tokens=6, ignore_eos=True)
    with Client(cached.target, timeout=60) as c, Client(plain.target, timeout=60) as p:
        c.generate(system, "a", cache_salt="tenant-1", max_new_tokens=1)
        for salt, copies in [("tenant-2", 0), ("", 0), ("tenant-1", 3 * BLOCK)]:
            before = scrape(cached)["loraplex_prompt_tokens_copied_total"]
            got = c.generate(system + [8, 9], "a", cache_salt=salt, **kwargs)
            assert scrape(cached)["loraplex_prompt_tokens_copied_total"] - before == copies, salt
            assert list(got.token_ids) == list(p.generate(system + [8, 9], "a", **kwargs).token_ids)
        with pytest.raises(grpc.RpcError) as info:
            c.generate(system, "a", cache_salt="s" * 257, max_new_tokens=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in info.value.details()


def test_a_cancelled_stream_keeps_what_it_ran(servers):
    """(sweep) A chat client that stops a reply sends the next turn with the text it had: what the cancelled request
    ran is kept as a finished one's is."""
    cached, _, _ = servers
    prompt = [(29 * i) % 200 + 9 for i in range(30)]
    with Client(cached.target, timeout=60) as client:
        stream = client.generate_stream(prompt, "a", max_new_tokens=200, ignore_eos=True)
        read = []
        for message in stream:
            read += message.token_ids
            if len(read) >= 20:
                break
        stream.cancel()
        assert wait_for(lambda: cached.serving.engine.idle())
        before = scrape(cached)["loraplex_prompt_tokens_copied_total"]
        client.generate(prompt + read[:20] + [7], "a", max_new_tokens=1)
    # its prompt, the 20 tokens read and what ran after them: the next turn's 51 tokens but the last, in whole blocks
    assert scrape(cached)["loraplex_prompt_tokens_copied_total"] - before == 3 * BLOCK

"""Every limit is a flag, listed by GetServerInfo, and its violation names the flag; KV capacity makes requests
wait instead of exhausting memory."""
import asyncio
import time
from pathlib import Path

import grpc
import pytest

from clients.client import AsyncClient, Client
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import make_peft_adapter, scrape, slow_decode, start_server, status_of, wait_for

C = grpc.StatusCode


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "small", 1, r=2, lora_alpha=4, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    s = start_server(model_dirs["llama"], adapter_root, max_prompt_tokens=20, max_new_tokens=50, max_kv_tokens=150,
                     max_adapter_bytes=1000, max_concurrent_rpcs=3, max_queue_size=7, max_hydra_heads=3,
                     max_prefill_tokens=40, stream_stall_timeout=12.5)
    yield s
    s.stop()


def test_server_info_lists_every_limit(server):
    with Client(server.target, timeout=30) as client:
        limits = client.server_info().limits
    assert (limits.max_prompt_tokens, limits.max_new_tokens, limits.max_kv_tokens) == (20, 50, 150)
    assert (limits.max_adapter_bytes, limits.max_concurrent_rpcs, limits.max_queue_size) == (1000, 3, 7)
    assert (limits.max_lora_rank, limits.max_hydra_heads, limits.max_batch_size) == (16, 3, 16)
    assert limits.max_active_adapters == 8 and limits.adapter_cache_bytes == 2 << 30
    assert (limits.max_prefill_tokens, limits.stream_stall_timeout_seconds) == (40, 12.5)


@pytest.mark.parametrize("flag,value,needle", [
    ("adapter_cache_bytes", -1, "--adapter-cache-bytes must be >= 1, got -1"),
    ("adapter_cache_bytes", 2 ** 64, "--adapter-cache-bytes must be < 2^64"),
    ("max_kv_tokens", 2 ** 64, "--max-kv-tokens must be < 2^64, got 18446744073709551616"),
    ("max_adapter_bytes", 2 ** 64, "--max-adapter-bytes must be < 2^64"),
    ("port", 70000, "--port must be <= 65535, got 70000"),
    ("port", -1, "--port must be >= 0 (0: a free port), got -1"),
    ("metrics_port", 70000, "--metrics-port must be <= 65535, got 70000"),
])
def test_values_beyond_what_a_limit_or_port_can_hold_are_refused_at_start(flag, value, needle):
    """GetServerInfo reports the byte and KV limits as uint64 (beyond: every call INTERNAL); grpc binds a port
    modulo 65536 (70000: 4464, -1: 65535) and the metrics server overflowed."""
    from server.config import ConfigError, ServerConfig, check_config
    with pytest.raises(ConfigError) as info:
        check_config(ServerConfig(**{flag: value}))
    assert needle in str(info.value)


def test_threads_beyond_a_few_per_cpu_are_refused(monkeypatch):
    import os

    from server.config import ConfigError, ServerConfig, check_config
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    check_config(ServerConfig(threads=8))
    with pytest.raises(ConfigError, match=r"--threads 100000 is more than 4 per CPU of this machine \(2 CPUs, so at "
                                          r"most 8\)"):
        check_config(ServerConfig(threads=100000))


def test_the_largest_uint64_limits_are_reported(model_dirs):
    top = 2 ** 64 - 1
    server = start_server(model_dirs["llama"], None, adapter_cache_bytes=top, max_adapter_bytes=top, max_kv_tokens=top)
    try:
        with Client(server.target, timeout=30) as client:
            limits = client.server_info().limits
        assert limits.adapter_cache_bytes == limits.max_adapter_bytes == limits.max_kv_tokens == top
    finally:
        server.stop()


def test_defaults_derive_from_the_model(model_dirs):
    server = start_server(model_dirs["llama"], None)
    try:
        with Client(server.target, timeout=30) as client:
            info = client.server_info()
        assert info.limits.max_prompt_tokens == info.limits.max_new_tokens == info.max_context_length
        assert info.limits.max_kv_tokens == info.max_batch_size * info.max_context_length
        assert not info.auth_required
        # a request that sets no max_new_tokens gets the default (64) within the room its prompt leaves
        context = info.max_context_length
        with Client(server.target, timeout=60) as client:
            reply = client.generate([5] * (context - 3), ignore_eos=True)
            assert len(reply.token_ids) == 3 and reply.finish_reason == pb.FINISH_REASON_LENGTH
            code, details = status_of(client.generate, [5] * (context - 3), max_new_tokens=4)  # asked for: refused
            assert code == C.OUT_OF_RANGE and "exceeds the model context" in details
            code, details = status_of(client.generate, [5] * context)
            assert code == C.OUT_OF_RANGE and "no room is left for a new token" in details
    finally:
        server.stop()


def test_prompt_and_new_token_limits_name_their_flags(server):
    with Client(server.target, timeout=30) as client:
        code, details = status_of(client.generate, list(range(5, 26)), max_new_tokens=2)
        assert code == C.INVALID_ARGUMENT and "21 tokens" in details and "--max-prompt-tokens 20" in details
        code, details = status_of(client.generate, "hi", max_new_tokens=51)
        assert code == C.INVALID_ARGUMENT and "--max-new-tokens 50" in details
        assert len(client.generate(list(range(5, 25)), max_new_tokens=3).token_ids) == 3  # at the limit: fine
        # beyond the model's context too: still the flag that was set below it (the README's INVALID_ARGUMENT)
        context = client.server_info().max_context_length
        code, details = status_of(client.generate, "hi", max_new_tokens=10 ** 9)
        assert code == C.INVALID_ARGUMENT and "--max-new-tokens 50" in details
        code, details = status_of(client.generate, [5] * (context + 1), max_new_tokens=2)
        assert code == C.INVALID_ARGUMENT and "--max-prompt-tokens 20" in details
        # the default a request gets is what it may have: 64 by default, capped by --max-new-tokens 50
        assert client.server_info().default_max_new_tokens == 50


def test_prompt_text_too_long_to_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    """A prompt with more characters than its token limit can hold (a token stands for at most max_token_chars of
    them) is refused without being tokenized: tokenizing a 4 MiB prompt took about 1 GB of server memory."""
    tokenizer = server.serving.base.tokenizer
    per_token = server.serving.base.max_token_chars
    calls = []
    original = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with Client(server.target, timeout=30) as client:
        code, details = status_of(client.generate, "a" * (20 * per_token + 1), max_new_tokens=2)
        assert code == C.INVALID_ARGUMENT and "--max-prompt-tokens 20" in details and "characters" in details
        code, details = status_of(client.generate, "a" * (3 << 20), max_new_tokens=2)  # 3 MiB: under gRPC's 4 MiB
        assert code == C.INVALID_ARGUMENT and "--max-prompt-tokens 20" in details  # the flag, set below the context
        assert calls == []
        # within the character bound the token count decides, after tokenizing
        code, details = status_of(client.generate, "a" * 21, max_new_tokens=2)
        assert code == C.INVALID_ARGUMENT and "21 tokens" in details and calls == [1]
        assert len(client.generate("a" * 20, max_new_tokens=2, ignore_eos=True).token_ids) == 2
        code, details = status_of(client.generate, [], max_new_tokens=2)
        assert code == C.INVALID_ARGUMENT and "prompt_token_ids is empty" in details


def test_kv_capacity_makes_requests_wait_not_fail(model_dirs, caplog):
    """Each request reserves (10 + 40) = 50 token slots; 120 holds two at a time, never three. 120 is below the
    context (512): the start warns that longer requests are refused, as it does where the free memory sets it."""
    import logging
    caplog.set_level(logging.INFO, logger="loraplex.app")
    server = start_server(model_dirs["llama"], None, max_kv_tokens=120)
    assert "requests whose prompt + max_new_tokens pass 120 tokens (the context is 512) are refused, OUT_OF_RANGE: " \
           "that many token slots is what --max-kv-tokens allows" in caplog.text
    try:
        async def run():
            async with AsyncClient(server.target, timeout=120) as client:
                return await asyncio.gather(*[client.generate(list(range(5 + i, 15 + i)), max_new_tokens=40,
                                                              ignore_eos=True) for i in range(6)])
        replies = asyncio.run(run())
        assert [len(r.token_ids) for r in replies] == [40] * 6
        # The engine tells a request its end before it retires the row and publishes the KV memory freed (the trim
        # does not delay the reply), so the last reply can arrive before that step is over. A call runs on the
        # engine thread between steps: once it has run, the step that finished the last request is complete.
        server.serving.engine.call(lambda: None).result(timeout=30)
        metrics = scrape(server)
        batches = metrics['loraplex_batch_size_count{phase="decode"}']
        assert metrics['loraplex_batch_size_bucket{le="2.0",phase="decode"}'] == batches  # never 3 rows at once
        assert metrics["loraplex_kv_cache_token_slots"] == metrics["loraplex_kv_cache_bytes"] == 0  # all returned
        with Client(server.target, timeout=30) as client:
            code, details = status_of(client.generate, list(range(5, 105)), max_new_tokens=30)
            assert code == C.OUT_OF_RANGE and "--max-kv-tokens 120" in details
    finally:
        server.stop()


def test_adapter_file_size_limit_names_the_flag(server):
    with Client(server.target, timeout=30) as client:
        code, details = status_of(client.generate, "hi", "small", max_new_tokens=2)
        assert code == C.FAILED_PRECONDITION and "--max-adapter-bytes 1000" in details
        assert len(client.generate("hi", max_new_tokens=2).token_ids) == 2  # and the server serves on


def test_concurrent_rpc_limit_names_the_flag(server, monkeypatch):
    decode_step = server.serving.engine.runner.decode_step
    # 40 steps take >= 0.2 s on any machine: the first three calls are still running when the others arrive
    monkeypatch.setattr(server.serving.engine.runner, "decode_step", lambda batch: (time.sleep(0.005),
                                                                                     decode_step(batch))[1])

    async def run():
        async with AsyncClient(server.target, timeout=60) as client:
            calls = [asyncio.ensure_future(client.generate(list(range(5, 10)), max_new_tokens=40, ignore_eos=True))
                     for _ in range(6)]
            await asyncio.sleep(0.05)  # the first three hold the limit: the operator's calls still get through
            assert await client.health() == 1 and (await client.server_info()).max_batch_size
            assert await client.list_adapters() is not None
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results
    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert refused and all(r.code() == C.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in r.details()
                           for r in refused)
    assert sum(not isinstance(r, Exception) for r in results) >= 3


def test_reflection_streams_are_counted_and_limited(server):
    """Bidirectional reflection streams count against --max-concurrent-rpcs and show in grpc_server_*: a client
    holding them open cannot take the server beyond its limit unseen."""
    import threading

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    hold = threading.Event()

    def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        hold.wait(30)  # the stream stays open until the test lets it end
    def reflection(name, **labels):  # the reflection streams' samples of one grpc_server_* metric, added up
        want = ['grpc_type="bidi_stream"', 'grpc_method="ServerReflectionInfo"',
                *(f'{k}="{v}"' for k, v in labels.items())]
        return sum(v for k, v in scrape(server).items() if k.startswith(name + "{") and all(w in k for w in want))
    started, received, ok = (reflection("grpc_server_started_total"), reflection("grpc_server_msg_received_total"),
                             reflection("grpc_server_handled_total", grpc_code="OK"))
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        streams = [stub.ServerReflectionInfo(requests()) for _ in range(3)]
        assert all(next(stream).list_services_response.service for stream in streams)
        with Client(server.target, timeout=30) as client:
            code, details = status_of(client.generate, "hi", max_new_tokens=2)
        assert code == C.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in details
        hold.set()
        assert all(list(stream) == [] for stream in streams)
    assert reflection("grpc_server_started_total") == started + 3
    assert reflection("grpc_server_msg_received_total") == received + 3  # each message, not each stream
    assert wait_for(lambda: reflection("grpc_server_handled_total", grpc_code="OK") == ok + 3)


def test_kv_buffers_never_exceed_what_the_running_rows_reserved(model_dirs):
    """After every prefill, step and retirement: token slots allocated <= --max-kv-tokens, and <= rows x planned peak
    (the reservation) but for the places of rows that left (kept for rows joining later, up to twice the
    reservation), with rows of different lengths joining and leaving."""
    server = start_server(model_dirs["llama"], None, max_kv_tokens=400, max_batch_size=6)
    engine, seen = server.serving.engine, []
    report = engine._report

    def checked():
        report()
        batch = engine._batch
        allocated = batch.cache.allocated()[0] if batch else 0
        left = batch is not None and (batch.cache.layers[0].k.shape[0] > len(batch) or batch.cache.layers[0].first > 0)
        seen.append((allocated, engine._kv_plan([])[1], left))
    engine._report = checked
    try:
        async def run():
            async with AsyncClient(server.target, timeout=120) as client:
                # alone on an idle engine, its prefill's cache is the batch's: 9 + 6 = 15 slots reserved, fewer
                # than the 16 columns a cache first grew to
                alone = await client.generate(list(range(3, 12)), max_new_tokens=6, ignore_eos=True)
                assert len(alone.token_ids) == 6
                return await asyncio.gather(*[client.generate(list(range(3, 3 + 2 + (7 * i) % 23)),
                                                              max_new_tokens=1 + (5 * i) % 37, ignore_eos=True)
                                              for i in range(16)])
        replies = asyncio.run(run())
        assert [len(r.token_ids) for r in replies] == [1 + (5 * i) % 37 for i in range(16)]
    finally:
        server.stop()
    assert len(seen) > 40 and max(a for a, _, _ in seen) > 0
    assert all(allocated <= 400 for allocated, _, _ in seen), max(seen)
    over = [s for s in seen if s[0] > s[1]]
    assert all(left and allocated <= 2 * reserved for allocated, reserved, left in over), over[:5]


def test_places_rows_left_are_given_back_before_prefills_would_pass_the_kv_budget(model_dirs, monkeypatch):
    """QA: the places of rows that left (kept for rows joining in place) and the prefill caches of newcomers the
    reservation admits passed --max-kv-tokens (580 slots of 400): running, prefilling and prefill buffers together
    stay within it."""
    server = start_server(model_dirs["llama"], None, max_kv_tokens=400, max_batch_size=4)
    slow_decode(server, monkeypatch, 0.02)
    engine, seen = server.serving.engine, []
    advance = engine.runner.advance

    def checked(job, columns):
        logits = advance(job, columns)  # (its cache is allocated by its first forward)
        held = [engine._batch, engine._prefilling, job if job is not engine._prefilling else None]
        seen.append(sum(x.cache.allocated()[0] for x in held if x is not None))
        return logits
    monkeypatch.setattr(engine.runner, "advance", checked)
    try:
        async def run():
            async with AsyncClient(server.target, timeout=120) as client:
                # 4 rows of 60 + 40 = 100 slots each: the whole budget; two leave, two of 90 + 10 take their places
                streams = [client.generate_stream(list(range(3 + i, 63 + i)), max_new_tokens=40, ignore_eos=True)
                           for i in range(4)]
                for stream in streams:
                    await anext(aiter(stream))
                for stream in streams[:2]:
                    stream.cancel()
                assert wait_for(lambda: engine._batch is not None and len(engine._batch) == 2)
                late = await asyncio.gather(*[client.generate(list(range(5 + i, 95 + i)), max_new_tokens=10,
                                                              ignore_eos=True) for i in range(2)])
                rest = [[m async for m in stream] for stream in streams[2:]]
                return late, rest
        late, rest = asyncio.run(run())
        assert [len(r.token_ids) for r in late] == [10, 10] and all(rest)
    finally:
        server.stop()
    assert max(seen) <= 400, seen


def _trained(normalizer, pre_tokenizer, model, special=(), added=()):
    from tokenizers import Tokenizer, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(model)
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    corpus = [(Path(__file__).parent.parent / "README.md").read_text()] * 2
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=list(special)))
    tok.add_special_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_the_prompt_character_bound_holds_or_is_not_used():
    """longest_token_chars bounds the characters per token where the tokenizer keeps every character (then no
    prompt is refused that would fit), and gives no bound where it may drop or fuse any number of them."""
    from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers

    from loader.base_model import longest_token_chars
    fallback = ["<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    bounded = {
        "byte-level": _trained(None, pre_tokenizers.ByteLevel(), models.BPE()),
        "sentencepiece, byte fallback": _trained(
            normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]), None,
            models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True), fallback),
    }
    unbounded = {
        "whitespace split": _trained(None, pre_tokenizers.Whitespace(), models.BPE(unk_token="<unk>"), ["<unk>"]),
        "unknowns fused": _trained(None, pre_tokenizers.Metaspace(), models.BPE(unk_token="<unk>", fuse_unk=True),
                                   ["<unk>"]),
        "spaces collapsed": _trained(normalizers.Replace(Regex(" {2,}"), "▁"), pre_tokenizers.Metaspace(),
                                     models.BPE(unk_token="<unk>", byte_fallback=True), fallback),
        "stripping added token": _trained(None, pre_tokenizers.ByteLevel(), models.BPE(),
                                          added=[AddedToken("<|end|>", lstrip=True, rstrip=True, special=True)]),
    }
    prompts = ["| name" + " " * 60 + "|\n" * 40, "模型服务器。" * 50, "e\u0301" * 100 + "한국어" * 30, "abc " * 200]
    for name, tok in bounded.items():
        bound = longest_token_chars(tok)
        assert bound is not None, name
        for prompt in prompts:
            assert len(prompt) <= len(tok(prompt).input_ids) * bound, (name, prompt[:20])
    for name, tok in unbounded.items():
        assert longest_token_chars(tok) is None, name


def test_adapter_labels_are_bounded_and_never_an_adapters_own():
    """The 101st id and later share one overflow label, which no adapter id can be: it was `other`, a valid id,
    whose own series then counted every overflowed adapter too."""
    from loader.registry import valid_id
    from server.metrics import BASE, OTHER, Metrics
    metrics = Metrics(max_batch_size=4, max_adapter_labels=100)
    labels = [metrics.adapter_label(name) for name in ["other", *(f"a{i}" for i in range(99)), "late", "later"]]
    assert labels[:100] == ["other", *(f"a{i}" for i in range(99))] and labels[100:] == [OTHER, OTHER]
    assert metrics.adapter_label("other") == "other" and metrics.adapter_label("") == BASE
    assert not valid_id(OTHER) and not valid_id(BASE)


@pytest.mark.parametrize("limit", [1024, 10])
def test_a_burst_of_calls_beyond_grpcs_default_queue_is_answered_not_cancelled(model_dirs, limit):
    """2000 calls at once (each ends fast: NOT_FOUND, or RESOURCE_EXHAUSTED beyond --max-concurrent-rpcs): grpc's
    own queue of calls not yet taken held 1000 by default and cancelled the rest at random, ~10%, CANCELLED and
    counted nowhere; set to 4 x the limit alone, a small limit made that cut sharper."""
    import asyncio
    import collections
    import uuid

    from clients.client import AsyncClient
    server = start_server(model_dirs["llama"], None, max_concurrent_rpcs=limit)
    try:
        async def burst():
            async with AsyncClient(server.target, timeout=120) as client:
                async def one(adapter_id):
                    try:
                        await client.generate("hi", adapter_id, max_new_tokens=1)
                        return "OK"
                    except grpc.RpcError as err:
                        return err.code().name
                return collections.Counter(await asyncio.gather(*[one(uuid.uuid4().hex) for _ in range(2000)]))
        outcomes = asyncio.run(burst())
        assert set(outcomes) <= {"NOT_FOUND", "RESOURCE_EXHAUSTED"} and sum(outcomes.values()) == 2000, outcomes
    finally:
        server.stop()

"""The Python clients (clients/client.py) against a real server: what they refuse before sending, and how their
streams end (cancellation on the server: test_lifecycle.py; tokens and TLS: test_security.py)."""
import asyncio
import threading
import time

import grpc
import pytest

from clients.client import AsyncClient, Client
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import make_peft_adapter, scrape, start_server, status_of, wait_for


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "demo", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    s = start_server(model_dirs["llama"], root)
    yield s
    s.stop()


def test_adapter_id_none_is_refused_never_the_base_model(server):
    """None (an unset environment variable) would go out as "", the base model: the README promises an id that
    names no adapter never gets the base model."""
    needle = 'adapter_id is None .*pass "" for the base model'
    with Client(server.target, timeout=30) as client:
        with pytest.raises(TypeError, match=needle):
            client.generate("hi", adapter_id=None, max_new_tokens=2)
        with pytest.raises(TypeError, match=needle):
            client.generate_stream("hi", None, max_new_tokens=2)
        assert len(client.generate("hi", "", max_new_tokens=2).token_ids) == 2  # "" is the base model

    async def scenario():
        async with AsyncClient(server.target, timeout=30) as client:
            with pytest.raises(TypeError, match=needle):
                await client.generate("hi", None, max_new_tokens=2)
            with pytest.raises(TypeError, match=needle):
                client.generate_stream("hi", adapter_id=None, max_new_tokens=2)
    asyncio.run(scenario())


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), 1e10])
def test_a_timeout_no_call_could_meet_is_refused(server, timeout):
    """Each was accepted, and every call then failed at once with DEADLINE_EXCEEDED, never sent (1e10 s overflows
    grpc's deadline). None, the default, is no deadline."""
    with pytest.raises(ValueError, match=r"^timeout must be a number of seconds > 0 and <= 1,000,000,000, or None"):
        Client(server.target, timeout=timeout)
    with pytest.raises(ValueError, match="^timeout must be"):
        asyncio.run(AsyncClient(server.target, timeout=timeout).close())


def test_timeouts_up_to_the_limit_and_none_reach_the_server(server):
    for timeout in (1e9, None, 30, 0.5):
        with Client(server.target, timeout=timeout) as client:
            assert len(client.generate("hi", max_new_tokens=2).token_ids) == 2
    with pytest.raises(TypeError, match="timeout must be a number of seconds, or None for no deadline, not str"):
        Client(server.target, timeout="30")

    async def scenario():
        async with AsyncClient(server.target, timeout=1e9) as client:
            return await client.generate("hi", max_new_tokens=2)
    assert len(asyncio.run(scenario()).token_ids) == 2


def test_a_sync_stream_cancelled_ends_its_loop_cleanly(server, monkeypatch):
    """cancel() inside the loop (as the docstring says, and as the async client's ends its loop) made the next
    iteration raise RpcError CANCELLED; from another thread, the blocked iteration likewise."""
    runner = server.serving.engine.runner
    decode_step = runner.decode_step  # 480 steps take >= 2.4 s: only a cancel ends them early
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(0.005), decode_step(batch))[1])
    key = 'loraplex_request_success_total{finished_reason="cancelled"}'
    with Client(server.target, timeout=60) as client:
        before = scrape(server).get(key, 0)
        stream = client.generate_stream([5, 6], max_new_tokens=480, ignore_eos=True)
        seen = 0
        for _ in stream:
            seen += 1
            if seen == 3:
                stream.cancel()
        assert seen == 3 and stream.code() == grpc.StatusCode.CANCELLED and list(stream) == []
        stream = client.generate_stream([5, 6], max_new_tokens=480, ignore_eos=True)
        next(stream)
        threading.Timer(0.2, stream.cancel).start()
        assert 1 < len(list(stream)) < 479  # ended by the cancel, in the middle
        assert wait_for(lambda: scrape(server).get(key, 0) == before + 2)
        assert scrape(server)["loraplex_num_requests_running"] == 0
        # the rest is as it was: a stream read to its end, next(), the server's errors raised at the first message
        messages = list(client.generate_stream([5, 6], max_new_tokens=3, ignore_eos=True))
        assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(m.token_ids) for m in messages) == 3
        stream = client.generate_stream([5, 6], max_new_tokens=3, ignore_eos=True)
        assert next(stream).token_ids and 0 < stream.time_remaining() <= 60  # the call's own attributes
        code, details = status_of(lambda: list(client.generate_stream("hi", "no-such-adapter")))
        assert code == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in details

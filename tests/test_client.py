"""The Python clients (clients/client.py) against a real server: what they refuse before sending, and how their
streams end (cancellation on the server: test_lifecycle.py; tokens and TLS: test_security.py)."""
import asyncio
import threading

import grpc
import numpy as np
import pytest

from clients.client import AsyncClient, Client
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import make_peft_adapter, scrape, slow_decode, start_server, status_of, wait_for


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
    slow_decode(server, monkeypatch)  # 480 steps take >= 2.4 s: only a cancel ends them early
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


@pytest.mark.parametrize("call,error,message", [
    (lambda c: c.generate(5), TypeError,
     "prompt must be text (str), token ids (a sequence of int) or chat messages (a sequence of dicts), not int"),
    (lambda c: c.generate([5, "6"]), TypeError, "prompt token id 1 must be an int, not str"),
    (lambda c: c.generate([5, 2 ** 40]), ValueError, "prompt token id 1 must be in [-2^31, 2^31)"),
    (lambda c: c.generate("x", adapter_id=5), TypeError, "adapter_id must be a str, not int"),
    (lambda c: c.generate("x", stop=None), TypeError, "stop must be a str or a sequence of str (() for none)"),
    (lambda c: c.generate("x", stop=("a", 1)), TypeError, "stop[1] must be a str, not int"),
    (lambda c: c.generate("x", stop="caf\udce9"), ValueError, "stop is not valid UTF-8: character 4"),
    (lambda c: c.generate("x", seed=-1), ValueError, "seed must be in [0, 2^64), what the request can carry: got -1"),
    (lambda c: c.generate("x", max_new_tokens="5"), TypeError, "max_new_tokens must be an int, not str"),
    (lambda c: c.generate("x", top_k=2 ** 31), ValueError, "top_k must be in [-2^31, 2^31)"),
    (lambda c: c.generate("x", temperature="0.5"), TypeError, "temperature must be a number, not str"),
    (lambda c: c.generate("x", ignore_eos="no"), TypeError, "ignore_eos must be True or False, not str"),
    (lambda c: c.generate("x", request_id=7), TypeError, "request_id must be a str, not int"),
    (lambda c: c.generate_stream("x", top_p="1"), TypeError, "top_p must be a number, not str"),
    (lambda c: c.generate("x", logit_bias=[(5, 1.0)]), TypeError, "logit_bias must be a dict of token id to bias"),
    (lambda c: c.generate("x", logit_bias={"5": 1.0}), TypeError, "logit_bias token id '5' must be an int"),
    (lambda c: c.generate("x", logit_bias={5: "1"}), TypeError, "logit_bias[5] must be a number, not str"),
    # (QA) None inside a sequence or map, an int beyond a double, bytes as stop and one message as the prompt named
    # nothing or the wrong argument (protobuf's "'NoneType' object cannot be interpreted as an integer", OverflowError)
    (lambda c: c.generate([5, None]), TypeError, "prompt token id 1 must be an int, not NoneType"),
    (lambda c: c.generate("x", stop_token_ids=[None]), TypeError, "stop_token_ids[0] must be an int, not NoneType"),
    (lambda c: c.generate("x", logit_bias={None: 1.0}), TypeError, "logit_bias token id None must be an int"),
    (lambda c: c.generate("x", logit_bias={5: None}), TypeError, "logit_bias[5] must be a number, not NoneType"),
    (lambda c: c.generate("x", temperature=10 ** 400), ValueError,
     "temperature must be within a double's range (about 1.8e308 either way): got an int of 1329 bits"),
    (lambda c: c.generate("x", logit_bias={5: -10 ** 400}), ValueError, "logit_bias[5] must be within a double's"),
    (lambda c: c.generate("x", stop=b"ab"), TypeError, "stop must be a str or a sequence of str (() for none), not bytes"),
    (lambda c: c.generate({"role": "user", "content": "hi"}), TypeError,
     "prompt must be text (str), token ids (a sequence of int) or chat messages (a sequence of dicts), not one dict"),
    (lambda c: c.load_adapter("demo", pin="no"), TypeError, "pin must be True or False or None, not str"),
    (lambda c: c.load_adapter("demo", replace=1), TypeError, "replace must be True or False, not int"),
    (lambda c: c.unload_adapter(None), TypeError, "adapter_id must be a str, not NoneType"),
    (lambda c: c.get_adapter(b"demo"), TypeError, "adapter_id must be a str, not bytes"),
])
def test_arguments_of_the_wrong_type_are_named(server, call, error, message):
    """protobuf's own messages named nothing ("bad argument type for built-in operation", "Value out of range: -1",
    "'NoneType' object is not iterable"); what a value means stays the server's to say (test_errors.py)."""
    with Client(server.target, timeout=30) as client:
        with pytest.raises(error) as info:
            call(client)
        assert str(info.value).startswith(message), info.value


def test_the_constructors_name_what_they_were_given(server):
    """Client(target, 30) meant a timeout and was taken as the channel (AttributeError: 'int' object has no
    attribute 'unary_unary' at the first call): every argument after the target is keyword-only."""
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3 were given"):
        Client(server.target, 30)
    with pytest.raises(TypeError, match=r"^channel must be a grpc.Channel or None, not int \(every argument after"):
        Client(server.target, channel=30)
    with pytest.raises(TypeError, match="^tls must be a Tls or None, not str"):
        Client(server.target, tls="ca.pem")
    with pytest.raises(TypeError, match="^target must be a str, not NoneType"):
        Client(None)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(TypeError, match="^channel must be a grpc.aio.Channel or None, not Channel"):
            AsyncClient(server.target, channel=channel)  # a sync channel given to the asyncio client
        client = Client("ignored", channel=channel)  # the channel given is the one used
        assert len(client.generate("hi", max_new_tokens=2).token_ids) == 2

    async def scenario():
        async with AsyncClient(server.target, timeout=30) as client:
            with pytest.raises(TypeError, match=r"^stop\[0\] must be a str, not bytes"):
                await client.generate("x", stop=[b"a"])
            with pytest.raises(TypeError, match="^pin must be True or False or None, not str"):
                await client.load_adapter("demo", pin="yes")
            return await client.generate(np.array([5, 6]), top_k=np.int64(3), temperature=np.float32(0.5),
                                         max_new_tokens=2)  # numpy numbers are numbers
    assert len(asyncio.run(scenario()).token_ids) == 2


def test_an_async_client_serves_the_loop_of_its_first_call_and_names_the_rule_elsewhere(server):
    """grpc.aio binds a channel to one event loop: a client made before asyncio.run failed in it ("attached to a
    different loop"), and one used again in a second asyncio.run failed with "Event loop is closed"."""
    client = AsyncClient(server.target, timeout=30)  # no loop runs yet

    async def generate():
        return list((await client.generate([5, 6], max_new_tokens=2, ignore_eos=True)).token_ids)

    async def generate_and_close():
        try:
            return await generate()
        finally:
            await client.close()
    assert len(asyncio.run(generate_and_close())) == 2
    with pytest.raises(RuntimeError, match="belongs to the event loop of its first call; a call from another loop"):
        asyncio.run(generate())


def test_numpy_booleans_are_flags_and_tokens_beyond_grpc_headers_are_refused(server):
    """numpy's bool was refused as 'must be True or False, not bool'; a token over 8 KiB passed the client and the
    server's token file alike, then grpc refused its header at random (16 KiB: always)."""
    from clients.arguments import build_request
    assert build_request("hi", ignore_eos=np.bool_(True)).stopping.ignore_eos is True
    with Client(server.target, timeout=30) as client:
        assert client.load_adapter("demo", replace=True, pin=np.bool_(False)).pinned is False
    with pytest.raises(ValueError, match="a token of 9000 characters is longer than 4096"):
        Client(server.target, token="t" * 9000)


def test_a_token_file_with_a_token_grpc_cannot_carry_is_refused(tmp_path):
    from server.auth import TokenFileError, read_tokens
    (tmp_path / "tokens").write_text("t" * 5000 + "\n")
    with pytest.raises(TokenFileError, match="at most 4096 characters"):
        read_tokens(str(tmp_path / "tokens"))
    (tmp_path / "tokens").write_text("tökén-0123456789abcdef\n")
    with pytest.raises(TokenFileError, match="printable ASCII"):
        read_tokens(str(tmp_path / "tokens"))

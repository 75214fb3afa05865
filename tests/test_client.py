"""The Python clients (clients/client.py) against a real server: what they refuse before sending, and how their
streams end (cancellation on the server: test_lifecycle.py; tokens and TLS: test_security.py)."""
import asyncio

import pytest

from clients.client import AsyncClient, Client
from tests.helpers import make_peft_adapter, start_server


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

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

"""Thin, typed wrappers over the loraplex.v1 stubs: one sync client, one asyncio client.

Both take an optional bearer token (sent as `authorization` metadata on every call) and an optional `Tls`
(server CA, and a client certificate for mutual TLS). `token_from(file, env)` reads a token the way the
CLI does: from a file or an environment variable, never from the command line."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.arguments import (adapter_request, build_request, check_text, check_timeout, check_token, load_request,
                               unload_request)
from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc

TOKEN_ENV = "LORAPLEX_TOKEN"


def token_from(path: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The first token in `path` (blank lines and # comments skipped), else $LORAPLEX_TOKEN, else None. Either is
    stripped (a mounted secret often ends in a newline) and checked as `check_token` does, naming where it was."""
    if path:
        for line in Path(path).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                if len(line.split()) > 1:  # as the server's token files: an inline comment would be sent along
                    raise ValueError(f"token file {path}: a token cannot hold whitespace (a comment goes on its own "
                                     f"line, starting with #)")
                return check_token(line.strip(), f"token file {path}")
        raise ValueError(f"token file {path} holds no token")
    return check_token(os.environ.get(env, "").strip(), f"${env}") or None


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA that signed the server's certificate (None: the system roots), and for mutual TLS
    the client's certificate chain and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):  # grpc's C core aborts the whole process on half a pair
            raise ValueError("a client certificate and its key go together (--tls-cert and --tls-key)")
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


# A reply has no size limit but the prompt's and the generated tokens' counts: with log-probabilities (20
# alternatives a token) for a long prompt it passes grpc's default 4 MiB (36000 tokens of a small vocabulary), and
# the call failed RESOURCE_EXHAUSTED after the server had done the work. This client trusts its server's replies.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", -1),)


def _call_options(target, channel, channel_type: type, timeout, token, tls) -> dict:
    """The keyword arguments of every call, once the constructor's arguments are checked (before a channel is made
    that would then leak)."""
    check_text("target", target)
    if channel is not None and not isinstance(channel, channel_type):  # Client(target, 30) meant a timeout
        name = "grpc.aio.Channel" if channel_type is grpc.aio.Channel else "grpc.Channel"
        raise TypeError(f"channel must be a {name} or None, not {type(channel).__name__} (every argument after the "
                        f"target is keyword-only: timeout=..., token=...)")
    if tls is not None and not isinstance(tls, Tls):
        raise TypeError(f"tls must be a Tls or None, not {type(tls).__name__}")
    timeout, token = check_timeout(timeout), check_token(token)
    return {"timeout": timeout, "metadata": (("authorization", f"Bearer {token}"),) if token else None}


class Stream:
    """Iterate the messages of a sync GenerateStream call; `.cancel()` stops it early, and the loop then ends, as an
    AsyncStream's does, whether cancel() ran in the loop or in another thread: grpc's call raised RpcError CANCELLED
    at the next message. Other attributes are the call's (code(), details(), is_active(), ...)."""

    def __init__(self, call) -> None:
        self.call = call
        self._cancelled = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> pb.GenerateStreamResponse:
        if self._cancelled:
            raise StopIteration
        try:
            return next(self.call)
        except grpc.RpcError as err:
            if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:  # our own cancel, not the server's
                raise StopIteration from None
            raise

    def cancel(self) -> bool:
        self._cancelled = True
        return self.call.cancel()

    def __getattr__(self, name: str):
        return getattr(self.call, name)


class Client:
    """`timeout`: each call's deadline in seconds (None, the default: no deadline). Every argument after the target
    is keyword-only. Arguments of the wrong type, or that a request cannot carry, are a TypeError or ValueError
    naming them, before anything is sent."""

    def __init__(self, target: str, *, channel: grpc.Channel | None = None, timeout: float | None = None,
                 token: str | None = None, tls: Tls | None = None) -> None:
        self._options = _call_options(target, channel, grpc.Channel, timeout, token, tls)
        self.channel = channel or (grpc.secure_channel(target, tls.credentials(), CHANNEL_OPTIONS) if tls
                                   else grpc.insecure_channel(target, CHANNEL_OPTIONS))
        self.timeout = self._options["timeout"]
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt, adapter_id: str = "", **kwargs) -> pb.GenerateResponse:
        return self.inference.Generate(build_request(prompt, adapter_id, **kwargs), **self._options)

    def generate_stream(self, prompt, adapter_id: str = "", **kwargs) -> "Stream":
        """Iterate the stream; `.cancel()` on it stops it early (inside the loop too: the loop then ends)."""
        return Stream(self.inference.GenerateStream(build_request(prompt, adapter_id, **kwargs), **self._options))

    def server_info(self) -> pb.ServerInfo:
        return self.inference.GetServerInfo(pb.GetServerInfoRequest(), **self._options)

    def load_adapter(self, adapter_id: str, replace: bool = False, pin: bool | None = None) -> pb.AdapterInfo:
        """pin None: a replace keeps the id's pin, a first load is evictable."""
        return self.adapters.LoadAdapter(load_request(adapter_id, replace, pin), **self._options)

    def unload_adapter(self, adapter_id: str, drain: bool = False) -> pb.UnloadAdapterResponse:
        return self.adapters.UnloadAdapter(unload_request(adapter_id, drain), **self._options)

    def list_adapters(self) -> list[pb.AdapterInfo]:
        return list(self.adapters.ListAdapters(pb.ListAdaptersRequest(), **self._options).adapters)

    def get_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return self.adapters.GetAdapter(adapter_request(adapter_id), **self._options)

    def health(self, service: str = "") -> int:
        return self.health_stub.Check(health_pb2.HealthCheckRequest(service=check_text("service", service)),
                                      **self._options).status

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream:
    """`async for` the messages of a GenerateStream call; `.cancel()` (or `await .aclose()`) stops it early, and so
    does dropping it unfinished (breaking out of the loop): the call is cancelled at that moment. An async generator
    around the call (what this client returned before) was closed only when the event loop next ran its finalizer,
    so a caller that left the loop and then blocked kept the server generating; grpc's call iterated directly stays
    alive in a reference cycle until the garbage collector runs. Other attributes are the call's (code(), ...)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call
        self._cancelled = False

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> pb.GenerateStreamResponse:
        if self._cancelled:  # cancel() inside the loop ends it, as a break would
            raise StopAsyncIteration
        try:
            message = await self.call.read()
        except asyncio.CancelledError:
            if self._cancelled:  # grpc's read of a call we cancelled, not this task being cancelled
                raise StopAsyncIteration from None
            raise
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    def cancel(self) -> bool:
        self._cancelled = True
        return self.call.cancel()

    async def aclose(self) -> None:  # what the async generator offered (contextlib.aclosing)
        self.cancel()

    def __getattr__(self, name: str):
        return getattr(self.call, name)

    def __del__(self) -> None:
        self.call.cancel()  # a no-op once the call has finished


class AsyncClient:
    """As Client, each call a coroutine; `generate_stream` returns an AsyncStream. A grpc.aio channel serves the event
    loop it was first used in: this client makes its channel at its first call, in that call's loop (so a client
    made before asyncio.run works), and refuses a call from another loop naming the rule (grpc failed there with
    "attached to a different loop" or "Event loop is closed"): make one client per loop."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None, timeout: float | None = None,
                 token: str | None = None, tls: Tls | None = None) -> None:
        self._options = _call_options(target, channel, grpc.aio.Channel, timeout, token, tls)
        self.timeout = self._options["timeout"]
        self._target, self._tls, self._channel = target, tls, channel
        self._loop = None  # the loop of the first call
        self._stubs = None

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._bound()[0]

    @property
    def inference(self) -> pb_grpc.InferenceStub:
        return self._bound()[1]

    @property
    def adapters(self) -> pb_grpc.AdaptersStub:
        return self._bound()[2]

    @property
    def health_stub(self) -> health_pb2_grpc.HealthStub:
        return self._bound()[3]

    def _bound(self) -> tuple:
        """(channel, inference, adapters, health stubs) for the running loop: the first call's."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("an AsyncClient's channel and stubs are used in a running event loop (its channel "
                               "belongs to the loop of its first call)") from None
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this AsyncClient's channel belongs to the event loop of its first call; a call from "
                               "another loop (a second asyncio.run, another thread's loop) needs its own AsyncClient")
        if self._stubs is None:
            if self._channel is None:
                self._channel = (grpc.aio.secure_channel(self._target, self._tls.credentials(), CHANNEL_OPTIONS)
                                 if self._tls else grpc.aio.insecure_channel(self._target, CHANNEL_OPTIONS))
            self._stubs = (self._channel, pb_grpc.InferenceStub(self._channel), pb_grpc.AdaptersStub(self._channel),
                           health_pb2_grpc.HealthStub(self._channel))
        return self._stubs

    async def generate(self, prompt, adapter_id: str = "", **kwargs) -> pb.GenerateResponse:
        return await self.inference.Generate(build_request(prompt, adapter_id, **kwargs), **self._options)

    def generate_stream(self, prompt, adapter_id: str = "", **kwargs) -> "AsyncStream":
        return AsyncStream(self.inference.GenerateStream(build_request(prompt, adapter_id, **kwargs), **self._options))

    async def server_info(self) -> pb.ServerInfo:
        return await self.inference.GetServerInfo(pb.GetServerInfoRequest(), **self._options)

    async def load_adapter(self, adapter_id: str, replace: bool = False, pin: bool | None = None) -> pb.AdapterInfo:
        return await self.adapters.LoadAdapter(load_request(adapter_id, replace, pin), **self._options)

    async def unload_adapter(self, adapter_id: str, drain: bool = False) -> pb.UnloadAdapterResponse:
        return await self.adapters.UnloadAdapter(unload_request(adapter_id, drain), **self._options)

    async def list_adapters(self) -> list[pb.AdapterInfo]:
        return list((await self.adapters.ListAdapters(pb.ListAdaptersRequest(), **self._options)).adapters)

    async def get_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return await self.adapters.GetAdapter(adapter_request(adapter_id), **self._options)

    async def health(self, service: str = "") -> int:
        return (await self.health_stub.Check(health_pb2.HealthCheckRequest(service=check_text("service", service)),
                                             **self._options)).status

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

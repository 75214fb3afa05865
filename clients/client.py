"""Thin, typed wrappers over the loraplex.v1 stubs: one sync client, one asyncio client."""
from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc


def build_request(prompt: str | Sequence[int], adapter_id: str = "", *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                  request_id: str = "") -> pb.GenerateRequest:
    """A text prompt or a sequence of token ids; unset sampling fields mean greedy decoding."""
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    stopping = pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos)
    request = pb.GenerateRequest(adapter_id=adapter_id, sampling=sampling, stopping=stopping, request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


class Client:
    def __init__(self, target: str, channel: grpc.Channel | None = None, timeout: float | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(target)
        self.timeout = timeout
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt, adapter_id: str = "", **kwargs) -> pb.GenerateResponse:
        return self.inference.Generate(build_request(prompt, adapter_id, **kwargs), timeout=self.timeout)

    def generate_stream(self, prompt, adapter_id: str = "", **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        """Iterate the stream; call `.cancel()` on the returned call object to stop early."""
        return self.inference.GenerateStream(build_request(prompt, adapter_id, **kwargs), timeout=self.timeout)

    def server_info(self) -> pb.ServerInfo:
        return self.inference.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)

    def load_adapter(self, adapter_id: str, replace: bool = False, pin: bool = False) -> pb.AdapterInfo:
        return self.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id, replace=replace, pin=pin),
                                         timeout=self.timeout)

    def unload_adapter(self, adapter_id: str) -> pb.UnloadAdapterResponse:
        return self.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=self.timeout)

    def list_adapters(self) -> list[pb.AdapterInfo]:
        return list(self.adapters.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout).adapters)

    def get_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return self.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=self.timeout)

    def health(self, service: str = "") -> int:
        return self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout).status

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, target: str, channel: grpc.aio.Channel | None = None, timeout: float | None = None) -> None:
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.timeout = timeout
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def generate(self, prompt, adapter_id: str = "", **kwargs) -> pb.GenerateResponse:
        return await self.inference.Generate(build_request(prompt, adapter_id, **kwargs), timeout=self.timeout)

    async def generate_stream(self, prompt, adapter_id: str = "", **kwargs) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self.inference.GenerateStream(build_request(prompt, adapter_id, **kwargs), timeout=self.timeout)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def server_info(self) -> pb.ServerInfo:
        return await self.inference.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)

    async def load_adapter(self, adapter_id: str, replace: bool = False, pin: bool = False) -> pb.AdapterInfo:
        return await self.adapters.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id=adapter_id, replace=replace, pin=pin), timeout=self.timeout)

    async def unload_adapter(self, adapter_id: str) -> pb.UnloadAdapterResponse:
        return await self.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=self.timeout)

    async def list_adapters(self) -> list[pb.AdapterInfo]:
        return list((await self.adapters.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout)).adapters)

    async def get_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return await self.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=self.timeout)

    async def health(self, service: str = "") -> int:
        return (await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                             timeout=self.timeout)).status

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

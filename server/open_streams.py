"""grpc's health and reflection services, with their long-lived streams ended when the server stops.

A load balancer keeps a health Watch open all the time, a tool may keep a reflection stream open, and neither ends
by itself. Left open at shutdown, asyncio cancels their handlers as the process exits, and grpc reports every
cancelled handler as an ERROR with two tracebacks (one logged, one printed): every deploy alerted. Here both end
with OK once `close()` is called (the server has said NOT_SERVING by then, so a watcher has heard it).
"""
from __future__ import annotations

import asyncio

from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection


class Closing:
    """Set once: every stream still open ends, and any opened later."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def close(self) -> None:
        self._event.set()

    async def race(self, step):
        """The result of awaiting `step` (an awaitable), or `Closing` if the server closes first."""
        stepping, closing = asyncio.ensure_future(step), asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({stepping, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when grpc cancels the handler (its client left): the step goes with it
            closing.cancel()
            if not stepping.done():
                stepping.cancel()
                await asyncio.gather(stepping, return_exceptions=True)
        return stepping.result() if not stepping.cancelled() else Closing  # its own error, if any, as grpc saw it


class HealthService(health.aio.HealthServicer):
    def __init__(self, closing: Closing) -> None:
        super().__init__()
        self._closing = closing

    async def Watch(self, request, context) -> None:
        await self._closing.race(super().Watch(request, context))


class ReflectionService(reflection.aio.ReflectionServicer):
    def __init__(self, service_names, closing: Closing) -> None:
        super().__init__(service_names)
        self._closing = closing

    async def ServerReflectionInfo(self, request_iterator, context):
        async for reply in super().ServerReflectionInfo(self._until_closed(request_iterator), context):
            yield reply

    async def _until_closed(self, requests):
        requests = requests.__aiter__()
        while True:
            try:
                request = await self._closing.race(requests.__anext__())
            except StopAsyncIteration:
                return
            if request is Closing:
                return
            yield request

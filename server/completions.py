"""GenerateRequest.n: several completions of one prompt. Each is its own request to the engine (its own row and
draw), made from the RPC's request here and merged back into one reply or one stream. Identical prompts of one
adapter and cache salt share their prefill (server/prompt_sharing.py), so the prompt is computed once."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import AsyncIterator

from protos.loraplex.v1 import inference_pb2 as pb
from server.errors import InvalidArgument

MAX_COMPLETIONS = 16


def count_of(request: pb.GenerateRequest) -> int | None:
    """n, or None where it is unset (one completion, in the reply's own fields)."""
    if not request.HasField("n"):
        return None
    if not 1 <= request.n <= MAX_COMPLETIONS:
        raise InvalidArgument(f"n is {request.n}: completions of one prompt must be 1 to {MAX_COMPLETIONS}")
    return request.n


def split(request: pb.GenerateRequest, n: int) -> list[pb.GenerateRequest]:
    """The n requests: one request id (made up here when empty), seed + i mod 2^64 where a seed is set, the
    prompt's log-probabilities asked with completion 0 only."""
    request_id = request.request_id or uuid.uuid4().hex
    parts = []
    for index in range(n):
        part = pb.GenerateRequest()
        part.CopyFrom(request)
        part.ClearField("n")
        part.request_id = request_id
        if index:
            part.ClearField("prompt_logprobs")
            if part.sampling.HasField("seed"):
                part.sampling.seed = (part.sampling.seed + index) % 2 ** 64
        parts.append(part)
    return parts


async def alone(events: AsyncIterator) -> AsyncIterator[tuple[int, object]]:
    """A request's own items, as completion 0's."""
    async with contextlib.aclosing(events):
        async for item in events:
            yield 0, item


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) of every stream, as each comes. The first stream to raise ends the merge with its exception,
    and the merge's end (its reader left, or that exception) closes every stream still open: each cancels its own
    request."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item))  # never awaits: a cancel finds the stream mid-read, not mid-yield
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, ended))
    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if item is ended:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

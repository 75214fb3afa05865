"""What both gRPC servicers share: the live server's parts once loaded, readiness, error replies, thread pools."""
from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from server.engine import Engine
from server.errors import LoraplexError, Unavailable, status_for

log = logging.getLogger("loraplex.servicers")


class Running:
    """A count of work items on executor threads, kept by the threads themselves: a handler the shutdown cancels
    stops waiting, but its thread goes on, and still counts."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def enter(self) -> None:
        with self._lock:
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


@dataclass
class Serving:
    """What the servicers reach once the model is loaded; None fields mean 'not ready yet' (but metrics, set
    before the model loads)."""

    engine: Engine | None = None
    registry: object = None
    base: object = None
    config: object = None
    metrics: object = None
    limits: object = None
    formats: object = None  # response formats' compiler (server/response_format.Formats)
    registry_changes: Running = field(default_factory=Running)  # LoadAdapter/UnloadAdapter work under way
    # {adapter id: {token of a request waiting for adapter host memory: its completions}}, before the engine's queue
    # (written on the event loop; the Adapters service counts them as waiting, and an unload waits for them or refuses)
    memory_waiting: dict[str, dict[object, int]] = field(default_factory=dict)
    # {id: UnloadAdapter calls with drain about to unload it}: loads of it are refused, and with auto-load off new
    # requests too, while the requests already waiting for memory go on (written on the event loop)
    unloading: Counter = field(default_factory=Counter)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, metrics=None) -> None:
    code, details = status_for(exc)
    if not isinstance(exc, LoraplexError):
        log.error("unexpected error", exc_info=exc)
    if metrics is not None:
        metrics.failure.labels(code.name).inc()
    # grpc keeps the abort's exception in a cycle, and through it `exc` with its traceback's frames and what they
    # held (a refused request's resolved adapter) until the cyclic collector ran; reported, the frames are done with
    chained, seen = exc, set()
    while chained is not None and id(chained) not in seen:  # (a chain may loop)
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__
    await context.abort(code, details)


def ready(serving: Serving) -> Serving:
    if serving.engine is None:
        raise Unavailable("the model is still loading; retry when health reports SERVING")
    if serving.engine.draining:
        raise Unavailable("the server is shutting down; retry on another replica")
    if not serving.engine.alive:
        raise Unavailable("the engine has stopped; this replica cannot serve")
    return serving


def waiting_for_memory(serving: Serving, adapter_id: str) -> int:
    """Requests (completions) of `adapter_id` waiting for adapter host memory."""
    return sum(serving.memory_waiting.get(adapter_id, {}).values())


def adapter_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """Threads for work that waits on an adapter id (a load, replace or unload holds it) or reads its files. Kept
    apart from asyncio's default executor (cores + 4 threads), which tokenizes every request and answers the
    Adapters service's reads: requests for one slow or cold adapter took all of its threads, and base-model
    requests and ListAdapters waited seconds behind them. Its threads are idle, not busy, while they wait."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"loraplex-{name}")

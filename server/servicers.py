"""gRPC servicers: validate protobufs, map them to engine types and back. No tensors here."""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import grpc

from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
from server.engine import Engine, EngineRequest, ErrorEvent, FinishEvent, TokenEvent
from server.errors import (AdapterMemoryFull, FailedPrecondition, InvalidArgument, LoraplexError, Unavailable,
                           status_for)
from server.stopping import FinishReason
from server.validation import MAX_REQUEST_ID, prompt_and_stopping, sampling_from

log = logging.getLogger("loraplex.servicers")

FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
          FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE}
KINDS = {"lora": pb.ADAPTER_KIND_LORA, "adalora": pb.ADAPTER_KIND_ADALORA, "hydralora": pb.ADAPTER_KIND_HYDRALORA,
         "reslora": pb.ADAPTER_KIND_RESLORA}


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
    """What the servicers reach once the model is loaded; None fields mean 'not ready yet'."""

    engine: Engine | None = None
    registry: object = None
    base: object = None
    config: object = None
    metrics: object = None
    limits: object = None
    registry_changes: Running = field(default_factory=Running)  # LoadAdapter/UnloadAdapter work under way


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, metrics=None) -> None:
    code, details = status_for(exc)
    if not isinstance(exc, LoraplexError):
        log.error("unexpected error", exc_info=exc)
    if metrics is not None:
        metrics.failure.labels(code.name).inc()
    await context.abort(code, details)


def _gathering(post: Callable[[object], None]) -> Callable[[object], None]:
    """A sink for the engine thread that keeps the tokens until the end, then posts them as one event."""
    ids: list[int] = []
    texts: list[str] = []

    def sink(event) -> None:
        if isinstance(event, TokenEvent):
            ids.extend(event.token_ids)
            texts.append(event.text)
            return
        if ids:
            post(TokenEvent(ids[:], "".join(texts)))
            ids.clear(), texts.clear()
        post(event)
    return sink


def _ready(serving: Serving) -> Serving:
    if serving.engine is None:
        raise Unavailable("the model is still loading; retry when health reports SERVING")
    if serving.engine.draining:
        raise Unavailable("the server is shutting down; retry on another replica")
    if not serving.engine.alive:
        raise Unavailable("the engine has stopped; this replica cannot serve")
    return serving


def adapter_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """Threads for work that waits on an adapter id (a load, replace or unload holds it) or reads its files. Kept
    apart from asyncio's default executor (cores + 4 threads), which tokenizes every request and answers the
    Adapters service's reads: requests for one slow or cold adapter took all of its threads, and base-model
    requests and ListAdapters waited seconds behind them. Its threads are idle, not busy, while they wait."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"loraplex-{name}")


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self._loop = asyncio.get_running_loop()  # built by serve(), on the loop that runs the handlers
        self.resolving = adapter_pool("resolve", 64)
        self._memory_freed = asyncio.Event()  # set (and replaced) whenever a release frees adapter memory
        self._memory_turn = asyncio.Lock()  # the one request waiting for adapter memory that may try again
        self._memory_waiters = 0

    def _submit(self, adapter_id: str, engine_request: EngineRequest) -> EngineRequest:
        """Queue a prepared request (blocking: run off the loop, on self.resolving when it names an adapter). The
        adapter is resolved and the request queued under the id's lock, so UnloadAdapter, which counts and unloads
        under it, sees the request."""
        metrics = self.serving.metrics
        if not adapter_id:
            engine_request.adapter_label = metrics.adapter_label("")
            self.serving.engine.submit(engine_request)
            return engine_request
        registry = self.serving.registry
        with registry.hold(adapter_id):
            engine_request.adapter = registry.resolve(adapter_id)  # released by _events or below
            # labelled only once resolved: unknown or malformed ids never take one of the bounded labels
            engine_request.adapter_label = metrics.adapter_label(adapter_id)
            try:
                self.serving.engine.submit(engine_request)
            except BaseException:
                self._loop.call_soon_threadsafe(self._release, engine_request)  # never returned: nobody else will
                raise
        return engine_request

    def _validate(self, request: pb.GenerateRequest) -> None:
        """What _submit would refuse before resolving: bad parameters or prompt, an id that names no adapter."""
        self._prepare(request)
        self.serving.registry.hold(request.adapter_id)

    def _release(self, engine_request: EngineRequest) -> None:
        """Once per request (on the event loop): its adapter's weights no longer count against the host-memory
        budget; requests waiting for room try again."""
        if engine_request.adapter is not None and not engine_request.released:
            engine_request.released = True
            if self.serving.registry.release(engine_request.adapter):
                self._wake_memory_waiters()

    def _wake_memory_waiters(self) -> None:  # on the event loop
        self._memory_freed.set()
        self._memory_freed = asyncio.Event()

    def _prepare(self, request: pb.GenerateRequest) -> EngineRequest:
        """Validation and tokenization: blocking work, run off the loop. The adapter is resolved by _submit."""
        s = _ready(self.serving)
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        sampling = sampling_from(request.sampling)
        ids, stopping = prompt_and_stopping(request, s.base, s.limits)
        return EngineRequest(request_id=request.request_id or uuid.uuid4().hex, prompt_ids=ids, adapter=None,
                             sampling=sampling, stopping=stopping, sink=lambda event: None)

    async def _events(self, request: pb.GenerateRequest, stream: bool):
        """(engine request, event) pairs for `request`: for a stream every step's tokens; for a unary call one
        event with all its tokens, then the end (its handler would only gather them: the tokens are gathered
        on the engine thread instead, and the loop is woken once, not once per token)."""
        events: asyncio.Queue = asyncio.Queue()
        post = functools.partial(self._loop.call_soon_threadsafe, events.put_nowait)
        engine_request = await self._queued(request, post if stream else _gathering(post))
        try:
            while True:
                event = await events.get()
                if isinstance(event, (FinishEvent, ErrorEvent)):  # before the client can send its next request
                    self._release(engine_request)
                if isinstance(event, ErrorEvent):
                    raise event.error
                yield engine_request, event
                if isinstance(event, FinishEvent):
                    return
        finally:  # client cancel, deadline or an error: free the row at the engine's next step
            engine_request.cancelled = True
            self._release(engine_request)

    async def _queued(self, request: pb.GenerateRequest, sink) -> EngineRequest:
        """Prepare and queue the request off the event loop. While its adapter does not fit the host-memory
        budget beside those that requests in flight hold, it waits, holding nothing (no thread, no weights), at
        most --max-queue-size requests at a time. Waiting requests try again one at a time, in arrival order,
        when a request releases its adapter, and while any wait, every request on an adapter waits behind them:
        otherwise steady traffic on adapters in memory would hold the budget and starve the rest."""
        arrival = time.monotonic()
        if request.adapter_id and self._memory_waiters:  # behind them, but a request that cannot run fails now
            await asyncio.get_running_loop().run_in_executor(None, self._validate, request)
        else:
            try:
                return await self._submitted(request, sink, arrival)
            except AdapterMemoryFull:
                pass
        if self._memory_waiters >= self.serving.config.max_queue_size:
            raise AdapterMemoryFull(f"{self._memory_waiters} requests already wait for adapter host memory "
                                    f"(--adapter-cache-bytes {self.serving.config.adapter_cache_bytes}, at most "
                                    f"--max-queue-size of them); retry later")
        self._memory_waiters += 1
        self.serving.metrics.waiting.inc()
        submitting = False
        try:
            async with self._memory_turn:
                while True:
                    _ready(self.serving)  # a shutdown ends the wait with UNAVAILABLE
                    freed = self._memory_freed
                    if self.serving.registry.might_fit(request.adapter_id):  # else trying would read it again
                        try:
                            submitting = True
                            return await self._submitted(request, sink, arrival)
                        except AdapterMemoryFull:
                            submitting = False
                            continue
                    try:  # looked at each second too: unloads and unpins free memory without a release
                        await asyncio.wait_for(freed.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        pass
        except asyncio.CancelledError:  # the client left (cancel, deadline) while waiting for room
            if not submitting:  # else the engine counts it, once its request is queued
                self.serving.metrics.success.labels(FinishReason.CANCELLED.value).inc()
            raise
        finally:
            self._memory_waiters -= 1
            self.serving.metrics.waiting.dec()

    async def _submitted(self, request: pb.GenerateRequest, sink, arrival: float) -> EngineRequest:
        """Validated and tokenized on the default executor, then resolved and queued (on self.resolving when it
        names an adapter). `arrival` (when the RPC came in) is set before queueing: queue time and TTFT include
        tokenization and adapter loading."""
        loop = asyncio.get_running_loop()

        async def prepare_and_submit() -> EngineRequest:
            engine_request = await loop.run_in_executor(None, self._prepare, request)
            engine_request.sink, engine_request.arrival = sink, arrival
            return await loop.run_in_executor(self.resolving if request.adapter_id else None, self._submit,
                                              request.adapter_id, engine_request)
        submitted = asyncio.ensure_future(prepare_and_submit())
        try:
            # shielded: a client that leaves while its request is being prepared (an adapter loading from disk,
            # a LoadAdapter holding the id) cannot stop the executor thread, so its request is cancelled once
            # queued instead of running to the end for nobody
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(self._cancel_once_queued)
            raise

    def _cancel_once_queued(self, submitted: asyncio.Future) -> None:
        if not submitted.cancelled() and submitted.exception() is None:
            submitted.result().cancelled = True
            self._release(submitted.result())

    async def Generate(self, request, context):
        try:
            ids, texts = [], []
            async for engine_request, event in self._events(request, stream=False):
                if isinstance(event, TokenEvent):
                    ids.extend(event.token_ids)
                    texts.append(event.text)
                else:
                    return pb.GenerateResponse(
                        request_id=engine_request.request_id, text="".join(texts), token_ids=ids,
                        finish_reason=FINISH[event.reason],
                        usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))
        except Exception as exc:
            await _abort(context, exc, self.serving.metrics)

    async def GenerateStream(self, request, context):
        try:
            async for engine_request, event in self._events(request, stream=True):
                if isinstance(event, TokenEvent):
                    yield pb.GenerateStreamResponse(request_id=engine_request.request_id, text=event.text,
                                                    token_ids=event.token_ids)
                else:
                    yield pb.GenerateStreamResponse(
                        request_id=engine_request.request_id, finish_reason=FINISH[event.reason],
                        usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))
        except Exception as exc:
            await _abort(context, exc, self.serving.metrics)

    async def GetServerInfo(self, request, context):
        try:
            s = _ready(self.serving)
            c, b = s.config, s.base
            return pb.ServerInfo(
                version="0.1.0", model=b.name, model_type=b.model_type, device=c.device, dtype=c.dtype,
                vocab_size=b.vocab_size, max_context_length=b.max_context, max_batch_size=c.max_batch_size,
                max_active_adapters=c.max_active_adapters, max_lora_rank=c.max_lora_rank,
                max_queue_size=c.max_queue_size, default_max_new_tokens=s.limits.default_max_new_tokens,
                autoload_adapters=c.autoload_adapters, auth_required=bool(c.auth_token_file),
                admin_auth_required=bool(c.admin_token_file or c.auth_token_file),
                adapter_kernel=s.engine.bank.kernel, adapter_dtype=str(s.engine.bank.dtype).removeprefix("torch."),
                limits=pb.Limits(
                    max_prompt_tokens=s.limits.max_prompt_tokens, max_new_tokens=s.limits.max_new_tokens,
                    max_concurrent_rpcs=c.max_concurrent_rpcs, max_queue_size=c.max_queue_size,
                    max_kv_tokens=s.limits.max_kv_tokens, max_adapter_bytes=c.max_adapter_bytes,
                    max_lora_rank=c.max_lora_rank, max_hydra_heads=c.max_hydra_heads,
                    max_batch_size=c.max_batch_size, max_active_adapters=c.max_active_adapters,
                    adapter_cache_bytes=c.adapter_cache_bytes),
                adapter_target_modules=[shape.name for shape in s.engine.bank.shapes],
                supported_adapter_kinds=[pb.ADAPTER_KIND_LORA, pb.ADAPTER_KIND_ADALORA,
                                         pb.ADAPTER_KIND_HYDRALORA, pb.ADAPTER_KIND_RESLORA])
        except Exception as exc:
            await _abort(context, exc)


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.changing = adapter_pool("admin", 16)  # LoadAdapter/UnloadAdapter: they wait on ids and read files

    def _info(self, record) -> pb.AdapterInfo:
        bank = self.serving.engine.bank
        key = record.weights.key if record.weights is not None else None
        if key is not None and bank.resident(key):
            tier = pb.ADAPTER_TIER_DEVICE
        else:
            tier = pb.ADAPTER_TIER_CPU if key is not None else pb.ADAPTER_TIER_DISK
        reslora = None
        if record.kind == "reslora":
            meta = record.metadata
            reslora = pb.ResLoraInfo(structure=meta["structure"], pre_num=meta["pre_num"],
                                     merge_method=meta["merge_method"], merge_error=meta["merge_error"])
        return pb.AdapterInfo(
            reslora=reslora, adapter_id=record.adapter_id, kind=KINDS[record.kind],
            rank=max(record.module_ranks.values(), default=0),
            module_ranks=record.module_ranks, target_modules=sorted(record.module_ranks), size_bytes=record.size_bytes,
            tier=tier, pinned=record.pinned, version=record.version,
            active_requests=bank.active_requests(record.adapter_id), heads=record.heads)

    async def _call(self, context, fn, *args):
        try:
            _ready(self.serving)
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except Exception as exc:
            await _abort(context, exc)

    async def _changing_registry(self, fn, *args):
        """Off the loop, counted: a LoadAdapter/UnloadAdapter the shutdown cuts (its client hears UNAVAILABLE)
        must not go on to be recorded for the restart (serve() freezes the state file when any is left)."""
        running = self.serving.registry_changes
        running.enter()  # before the thread starts: a change submitted just before the cut counts too

        def work():
            try:
                return fn(*args)
            finally:
                running.leave()
        future = self.changing.submit(work)
        # Cancelled before a thread took it (its client left, or the shutdown emptied the pool): it never runs,
        # so it is no longer under way.
        future.add_done_callback(lambda f: f.cancelled() and running.leave())
        return await asyncio.wrap_future(future)

    async def LoadAdapter(self, request, context):
        try:
            _ready(self.serving)
            info = await self._changing_registry(lambda: self._info(self.serving.registry.load(
                request.adapter_id, request.replace, request.pin if request.HasField("pin") else None)))
        except Exception as exc:
            await _abort(context, exc)
            return
        # the operator's actions, in the log (an audit trail; failures are their status). A load's version is 1
        # unless it replaced one, whatever the request's `replace` said.
        log.info("LoadAdapter %r: version %d, %s, %s", info.adapter_id, info.version,
                 "replaced" if info.version > 1 else "loaded", "pinned" if info.pinned else "not pinned")
        return info

    async def UnloadAdapter(self, request, context):
        """Refuses while requests run on the adapter, unless `drain`: then new requests stop finding it at once
        and the call returns when the running ones have finished (bounded by the caller's deadline)."""
        try:
            s = _ready(self.serving)
            versions, in_flight = await self._changing_registry(self._count_and_unload, s, request)
            log.info("UnloadAdapter %r: unloaded, %d requests in flight%s", request.adapter_id, in_flight,
                     " (draining)" if in_flight else "")
            while versions:  # requests that auto-load the id again meanwhile get a new version: not waited for
                await asyncio.sleep(0.02)
                if not s.engine.alive:  # a shutdown does not end the wait: the unload is done and recorded, and
                    raise Unavailable("the engine has stopped; this replica cannot serve")  # its grace ends them
                now = await asyncio.wrap_future(s.engine.requests_on(request.adapter_id))
                versions = {key: n for key, n in now.items() if key in versions}
            return pb.UnloadAdapterResponse(adapter_id=request.adapter_id, drained_requests=in_flight)
        except Exception as exc:
            await _abort(context, exc)

    @staticmethod
    def _count_and_unload(s: Serving, request: pb.UnloadAdapterRequest):
        """Under the id's lock (see InferenceServicer._submit): requests resolved before it are all counted."""
        with s.registry.hold(request.adapter_id):
            s.registry.get(request.adapter_id)  # NOT_FOUND / INVALID_ARGUMENT
            counted = s.engine.requests_on(request.adapter_id)  # the engine answers between steps
            while True:
                try:
                    versions = counted.result(timeout=1.0)
                    break
                except FutureTimeout:
                    _ready(s)  # a dead engine or a shutdown ends the wait with UNAVAILABLE
            in_flight = sum(versions.values())
            if in_flight and not request.drain:
                plural = "s" * (in_flight != 1)
                raise FailedPrecondition(f"adapter {request.adapter_id!r} has {in_flight} request{plural} in flight "
                                         f"(running or waiting); set drain to unload it once they finish, or retry "
                                         f"later")
            s.registry.unload(request.adapter_id)
        return versions, in_flight

    async def ListAdapters(self, request, context):
        return await self._call(context, lambda: pb.ListAdaptersResponse(
            adapters=[self._info(r) for r in self.serving.registry.records()]))

    async def GetAdapter(self, request, context):
        return await self._call(context, lambda: self._info(self.serving.registry.get(request.adapter_id)))

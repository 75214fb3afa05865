"""The Inference gRPC service: validate protobufs, map them to engine types and back. No tensors here."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
import weakref
from typing import Callable

from loader.chat_template import template_problem
from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
from server import replies
from server.completions import copies, count_of
from server.engine_messages import EngineRequest, ErrorEvent, FinishEvent, TokenEvent
from server.errors import AdapterMemoryFull, InvalidArgument, NotFound, status_for
from server.fair_queue import queue_cap_message
from server.response_format import check_stopping, format_of
from server.serving import Serving, abort, adapter_pool, ready, waiting_for_memory
from server.stopping import FinishReason
from server.validation import MAX_CACHE_SALT, MAX_REQUEST_ID, logprobs_from, prompt_and_stopping, sampling_from

# Requests of one adapter id on the resolving pool at once; the rest wait on the event loop, holding no thread. Its
# id lock serialises their resolving anyway, and while a LoadAdapter or a slow read holds that lock, the threads
# they would block are the pool's, which every other adapter's requests need (70 waiting on one id took the pool).
THREADS_PER_ADAPTER = 4


class _EngineFailed(Exception):
    """The engine ended the request with `error`, counted in request_failure_total when it did (_ending)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class _IdGate:
    """One adapter id's requests on their way to the resolving pool (InferenceServicer._enter_gate)."""

    def __init__(self) -> None:
        self.places = asyncio.Semaphore(THREADS_PER_ADAPTER)
        self.users = 0  # requests holding or waiting for a place: the gate is dropped at 0
        self.read: asyncio.Future | None = None  # while one of them reads the id's files; done when it has


def _gathering(post: Callable[[object], None]) -> Callable[[object], None]:
    """A sink for the engine thread that keeps the tokens until the end, then posts them as one event."""
    ids: list[int] = []
    texts: list[str] = []
    logprobs: list = []
    prompt: list = []  # the first event's prompt log-probabilities, where asked for

    def sink(event) -> None:
        if isinstance(event, TokenEvent):
            if not ids:
                prompt.append(event.prompt_logprobs)
            ids.extend(event.token_ids)
            texts.append(event.text)
            logprobs.extend(event.logprobs or ())
            return
        if ids:
            post(TokenEvent(ids[:], "".join(texts), logprobs[:] or None, prompt[0]))
            ids.clear(), texts.clear(), logprobs.clear(), prompt.clear()
        post(event)
    return sink


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self._loop = asyncio.get_running_loop()  # built by serve(), on the loop that runs the handlers
        self.resolving = adapter_pool("resolve", 64)
        self._memory_freed = asyncio.Event()  # set (and replaced) whenever a release frees adapter memory
        self._memory_turn = asyncio.Lock()  # the one request waiting for adapter memory that may try again
        self._memory_waiters = 0
        self._gates: dict[str, _IdGate] = {}
        self._cold: asyncio.Semaphore | None = None  # the registry's reads at once (made at first use: after it)

    def _submit(self, adapter_id: str, engine_requests: list[EngineRequest]) -> list[EngineRequest]:
        """Queue a prepared request's completions, all or none (blocking: run off the loop, on self.resolving when it
        names an adapter). The adapter is resolved and the completions queued under the id's lock, so each holds the
        same version, and UnloadAdapter, which counts and unloads under it, sees all of them or none."""
        metrics = self.serving.metrics
        if not adapter_id:
            for engine_request in engine_requests:
                engine_request.adapter_label = metrics.adapter_label("")
            self.serving.engine.submit(*engine_requests)
            return engine_requests
        registry = self.serving.registry
        with registry.hold(adapter_id):
            try:
                for engine_request in engine_requests:  # the first may read the files; the others find them held
                    engine_request.adapter = registry.resolve(adapter_id)  # released when it ends (_ending)
                    # labelled only once resolved: unknown or malformed ids never take one of the bounded labels
                    engine_request.adapter_label = metrics.adapter_label(adapter_id)
                self.serving.engine.submit(*engine_requests)
            except BaseException:
                for engine_request in engine_requests:  # never returned: nobody else will release them
                    self._loop.call_soon_threadsafe(self._release, engine_request)
                raise
        return engine_requests

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

    def _cancel(self, engine_requests: list[EngineRequest]) -> None:
        """A call's completions end (its client left, or one failed): dropped at the engine's next step, their
        adapter released now."""
        for engine_request in engine_requests:
            engine_request.cancelled = True
            self._release(engine_request)

    def _ending(self, engine_request: EngineRequest, sink: Callable[[object], None]) -> Callable[[object], None]:
        """`sink`, releasing the request's adapter the moment the engine ends it, before its handler sees the end:
        a stream whose client stops reading leaves its handler blocked on an earlier token, and would otherwise
        hold the adapter's memory (and every request waiting for room) until the client reads or leaves."""
        ended = []
        # weak: the request holds this sink, and a cycle would keep the request, and its adapter's weights with it,
        # after an eviction or unload until Python's cyclic collector ran (whoever calls the sink holds the request)
        request = weakref.ref(engine_request)

        def deliver(event) -> None:  # on the engine thread
            if isinstance(event, (FinishEvent, ErrorEvent)):
                if ended:  # a step that failed after _emit had ended the row: the engine's second word on it
                    return
                ended.append(event)
            if isinstance(event, FinishEvent):  # (counted by the engine)
                self._loop.call_soon_threadsafe(self._release, request())
            elif isinstance(event, ErrorEvent):  # counted now too: a client that never reads it is gone by then
                self._loop.call_soon_threadsafe(self._failed, request(), event.error)
            sink(event)
        return deliver

    def _failed(self, engine_request: EngineRequest, error: Exception) -> None:  # on the event loop
        self._release(engine_request)
        metrics = self.serving.metrics
        if engine_request.cancelled:  # its client had left: a cancel, as the engine counts one (_finish_metrics)
            self._count_cancel(engine_request.arrival, engine_request.adapter_label)
        else:
            metrics.failure.labels(status_for(error)[0].name).inc()

    def _wake_memory_waiters(self) -> None:  # on the event loop
        self._memory_freed.set()
        self._memory_freed = asyncio.Event()

    def _prepare(self, request: pb.GenerateRequest, count: int = 1) -> list[EngineRequest]:
        """Validation and tokenization, once for the request's `count` completions: blocking work, run off the loop.
        The adapter is resolved by _submit."""
        s = ready(self.serving)
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        if len(request.cache_salt) > MAX_CACHE_SALT:
            raise InvalidArgument(f"cache_salt is longer than {MAX_CACHE_SALT} characters")
        sampling, logprobs = sampling_from(request.sampling, s.base.vocab_size), logprobs_from(request)
        prompt_logprobs = logprobs_from(request, "prompt_logprobs")
        ids, stopping = prompt_and_stopping(request, s.base, s.limits)
        output_format = format_of(request)
        if output_format is not None:
            check_stopping(stopping)
        matcher = None if output_format is None else functools.partial(s.formats.matcher, *output_format)
        first = EngineRequest(request_id=request.request_id or uuid.uuid4().hex, prompt_ids=ids, adapter=None,
                              sampling=sampling, stopping=stopping, sink=lambda event: None, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, cache_salt=request.cache_salt,
                              matcher=None if matcher is None else matcher(), completions=count)
        return copies(first, count, matcher)

    async def _events(self, request: pb.GenerateRequest, count: int, stream: bool):
        """(index, (engine request, event)) pairs of the request's `count` completions (GenerateRequest.n, else 1),
        as they come: for a stream every step's tokens; for a unary call one event with all of a completion's
        tokens, then its end (its handler would only gather them: the tokens are gathered on the engine thread
        instead, and the loop is woken once per completion, not once per token). The first completion to fail ends
        them all."""
        events: asyncio.Queue = asyncio.Queue()

        def poster(index: int) -> Callable[[object], None]:
            return lambda event: self._loop.call_soon_threadsafe(events.put_nowait, (index, event))
        sinks = [poster(index) if stream else _gathering(poster(index)) for index in range(count)]
        engine_requests = await self._queued(request, sinks)
        try:
            running = count
            while running:
                index, event = await events.get()
                if isinstance(event, ErrorEvent):
                    raise _EngineFailed(event.error)
                yield index, (engine_requests[index], event)
                running -= isinstance(event, FinishEvent)
        finally:  # client cancel, deadline or an error: free the rows at the engine's next step
            self._cancel(engine_requests)

    async def _queued(self, request: pb.GenerateRequest, sinks: list) -> list[EngineRequest]:
        """Prepare and queue the request off the event loop. While its adapter does not fit the host-memory
        budget beside those that requests in flight hold, it waits, holding nothing (no thread, no weights), at
        most --max-queue-size requests at a time. Waiting requests try again one at a time, in arrival order,
        when a request releases its adapter, and while any wait, every request on an adapter waits behind them:
        otherwise steady traffic on adapters in memory would hold the budget and starve the rest."""
        arrival, count = time.monotonic(), len(sinks)
        self._refuse_if_unloading(request.adapter_id)
        ready(self.serving).engine.check_count(count)  # before a read or a wait that could never help
        if request.adapter_id and self._memory_waiters:  # behind them, but a request that cannot run fails now
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._validate, request)
            except asyncio.CancelledError:  # the client left first: that is how it ended, whatever the check says
                self._count_cancelled(request.adapter_id, arrival)
                raise
        else:
            try:
                return await self._submitted(request, sinks, arrival)
            except AdapterMemoryFull:
                pass
        if self._memory_waiters + count > self.serving.config.max_queue_size:
            raise AdapterMemoryFull(f"{self._memory_waiters} requests already wait for adapter host memory "
                                    f"(--adapter-cache-bytes {self.serving.config.adapter_cache_bytes}, at most "
                                    f"--max-queue-size of them); retry later")
        cap = self.serving.config.max_queue_per_adapter
        adapter_id = request.adapter_id
        queued = waiting_for_memory(self.serving, adapter_id) + self.serving.engine.pending_for(adapter_id)
        if cap and queued + count > cap:  # waiting for memory or for a row (no free rows count here: none serve them)
            raise AdapterMemoryFull(queue_cap_message(adapter_id, cap) if count == 1 else
                                    f"adapter {adapter_id!r} has {queued} requests waiting and {count} more "
                                    f"would wait for adapter host memory with them (--max-queue-per-adapter {cap}); "
                                    f"retry later, or ask for fewer completions")
        self._refuse_if_unloading(request.adapter_id)  # (a drain may have begun while it was looked at)
        self._memory_waiters += count
        token = object()
        self.serving.memory_waiting.setdefault(request.adapter_id, {})[token] = count  # its completions
        # It resolves its adapter only once there is room, and would read an evicted one again from disk (whatever
        # its files are by then): the weights it came for are kept as recently used.
        self.serving.registry.touch(adapter_id)
        self.serving.metrics.waiting.inc(count)
        submitting = False
        try:
            async with self._memory_turn:
                while True:
                    ready(self.serving)  # a shutdown ends the wait with UNAVAILABLE
                    freed = self._memory_freed
                    if self.serving.registry.might_fit(request.adapter_id):  # else trying would read it again
                        try:
                            submitting = True
                            return await self._submitted(request, sinks, arrival)
                        except AdapterMemoryFull:
                            submitting = False
                            continue
                    try:  # looked at each second too: unloads and unpins free memory without a release
                        await asyncio.wait_for(freed.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        pass
        except asyncio.CancelledError:  # the client left (cancel, deadline) while waiting for room
            if not submitting:  # else _submitted, _cancel_once_queued or the engine counts it
                self._count_cancelled(request.adapter_id, arrival)
            raise
        finally:
            self._memory_waiters -= count
            waiting = self.serving.memory_waiting
            del waiting[request.adapter_id][token]
            if not waiting[request.adapter_id]:  # ids come and go: no entry outlives its requests
                del waiting[request.adapter_id]
            self.serving.metrics.waiting.dec(count)

    def _refuse_if_unloading(self, adapter_id: str) -> None:
        """A drain is about to unload the id, and auto-load is off: refused as after it, not one more to wait for
        (with auto-load on a request after the unload would load it again: it uses it)."""
        if self.serving.unloading[adapter_id] and not self.serving.config.autoload_adapters:
            raise NotFound(f"adapter {adapter_id!r} is being unloaded (UnloadAdapter with drain) and auto-load is "
                           f"off; once that call returns, LoadAdapter serves it again")

    async def _submitted(self, request: pb.GenerateRequest, sinks: list, arrival: float) -> list[EngineRequest]:
        """Validated, tokenized, resolved and queued in one trip off the loop (on self.resolving when it names an
        adapter, whose read may block on disk; else on the default executor). `arrival` (when the RPC came in) is
        set before queueing: queue time and TTFT include tokenization and adapter loading."""
        ready(self.serving)  # (the gate asks the registry, which does not exist while the model loads)

        def prepare_and_submit() -> list[EngineRequest]:
            engine_requests = self._prepare(request, len(sinks))
            for engine_request, sink in zip(engine_requests, sinks):
                engine_request.sink, engine_request.arrival = self._ending(engine_request, sink), arrival
            return self._submit(request.adapter_id, engine_requests)
        leave = None
        if request.adapter_id:
            try:
                leave = await self._enter_gate(request.adapter_id)
            except asyncio.CancelledError:  # the client left before its request was looked at
                self._count_cancelled(request.adapter_id, arrival)
                raise
        submitted = asyncio.get_running_loop().run_in_executor(self.resolving if request.adapter_id else None,
                                                               prepare_and_submit)
        if leave is not None:
            submitted.add_done_callback(leave)  # when the thread is done, not when a client that left stops waiting
        try:
            # shielded: a client that leaves while its request is being prepared (an adapter loading from disk,
            # a LoadAdapter holding the id) cannot stop the executor thread, so its request is cancelled once
            # queued instead of running to the end for nobody
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(functools.partial(self._cancel_once_queued, request.adapter_id, arrival))
            raise

    async def _enter_gate(self, adapter_id: str) -> Callable[[object], None]:
        """Wait on the loop, holding no thread, for one of the id's THREADS_PER_ADAPTER places, and while the id's
        weights are not in memory, for its read: one request reads (taking one of the registry's reads at once),
        the others wait for it to end and look again. Returns what gives the places back. Cold reads took the pool
        otherwise: requests for many cold ids sat on its threads waiting their turn to read, and those for
        adapters in memory waited behind them."""
        gate = self._gates.setdefault(adapter_id, _IdGate())
        gate.users += 1
        taken: list[asyncio.Semaphore] = []
        reading: list[asyncio.Future] = []

        def leave(_=None) -> None:
            for place in taken:
                place.release()
            for read in reading:  # this request was the reader: its waiters look again
                read.set_result(None)
                gate.read = None
            gate.users -= 1
            if gate.users == 0:  # ids come and go (random ones too): no gate outlives its requests
                del self._gates[adapter_id]
        try:
            await gate.places.acquire()
            taken.append(gate.places)
            while not self.serving.registry.in_memory(adapter_id):  # (evicted meanwhile: its read is bounded anyway)
                if gate.read is None:
                    gate.read = asyncio.get_running_loop().create_future()
                    reading.append(gate.read)
                    self._cold = self._cold or asyncio.Semaphore(self.serving.registry.reads_at_once)
                    await self._cold.acquire()
                    taken.append(self._cold)
                    break
                await asyncio.wait([gate.read])  # (a cancel here ends this wait, not the read)
        except BaseException:
            leave()
            raise
        return leave

    def _cancel_once_queued(self, adapter_id: str, arrival: float, submitted: asyncio.Future) -> None:
        """The client left while its request was being prepared. Queued: its completions cancelled there (the engine
        counts each). Refused meanwhile (an unknown adapter, a bad parameter): counted here, once, as the client's
        cancel it was."""
        if not submitted.cancelled() and submitted.exception() is None:
            self._cancel(submitted.result())
        else:
            self._count_cancelled(adapter_id, arrival)

    def _count_cancelled(self, adapter_id: str, arrival: float) -> None:
        """A request whose client left before it reached the engine, counted as the engine counts a cancelled row:
        every call ends in exactly one of request_success_total / request_failure_total (a cancel or a passed
        deadline is success{cancelled}), with its latency, and per adapter where the id is known to name one (an
        id never read may name nothing: it takes no label)."""
        metrics = self.serving.metrics
        known = not adapter_id or self.serving.registry.known(adapter_id)
        self._count_cancel(arrival, metrics.adapter_label(adapter_id) if known else None)

    def _count_cancel(self, arrival: float, label: str | None) -> None:
        """One cancelled request: success{cancelled}, its latency, and its adapter's label where it has one."""
        metrics = self.serving.metrics
        metrics.success.labels(FinishReason.CANCELLED.value).inc()
        metrics.e2e.observe(time.monotonic() - arrival)
        if label is not None:
            metrics.adapter_requests.labels(label).inc()

    async def Generate(self, request, context):
        try:
            n = count_of(request)
            return await replies.unary(self._events(request, n or 1, stream=False), n)
        except _EngineFailed as failed:
            await abort(context, failed.error)  # (counted as the engine ended it)
        except Exception as exc:
            await abort(context, exc, self.serving.metrics)

    async def GenerateStream(self, request, context):
        try:
            n = count_of(request)
            async with contextlib.aclosing(replies.stream(self._events(request, n or 1, stream=True))) as messages:
                async for message in messages:
                    yield message
        except _EngineFailed as failed:
            await abort(context, failed.error)  # (counted as the engine ended it)
        except Exception as exc:
            await abort(context, exc, self.serving.metrics)

    async def GetServerInfo(self, request, context):
        try:
            s = ready(self.serving)
            c, b = s.config, s.base
            return pb.ServerInfo(
                version="0.1.0", model=b.name, model_type=b.model_type, device=c.device, dtype=c.dtype,
                vocab_size=b.vocab_size, max_context_length=b.max_context, max_batch_size=c.max_batch_size,
                max_active_adapters=c.max_active_adapters, max_lora_rank=c.max_lora_rank,
                max_queue_size=c.max_queue_size, default_max_new_tokens=s.limits.default_max_new_tokens,
                autoload_adapters=c.autoload_adapters, auth_required=bool(c.auth_token_file),
                admin_auth_required=bool(c.admin_token_file or c.auth_token_file),
                adapter_kernel=s.engine.bank.kernel, adapter_dtype=str(s.engine.bank.dtype).removeprefix("torch."),
                chat_template=template_problem(b.tokenizer) is None, response_format=s.formats.problem is None,
                scheduling=c.scheduling,
                preemption=c.scheduling == "fair" and c.preemption,
                limits=pb.Limits(
                    max_prompt_tokens=s.limits.max_prompt_tokens, max_new_tokens=s.limits.max_new_tokens,
                    max_concurrent_rpcs=c.max_concurrent_rpcs, max_queue_size=c.max_queue_size,
                    max_kv_tokens=s.limits.max_kv_tokens, max_adapter_bytes=c.max_adapter_bytes,
                    max_lora_rank=c.max_lora_rank, max_hydra_heads=c.max_hydra_heads,
                    max_batch_size=c.max_batch_size, max_active_adapters=c.max_active_adapters,
                    adapter_cache_bytes=c.adapter_cache_bytes,
                    prefix_cache_tokens=s.limits.prefix_cache_tokens, max_queue_per_adapter=c.max_queue_per_adapter,
                    max_prefill_tokens=c.max_prefill_tokens, stream_stall_timeout_seconds=c.stream_stall_timeout),
                adapter_target_modules=[shape.name for shape in s.engine.bank.shapes],
                supported_adapter_kinds=[pb.ADAPTER_KIND_LORA, pb.ADAPTER_KIND_ADALORA,
                                         pb.ADAPTER_KIND_HYDRALORA, pb.ADAPTER_KIND_RESLORA])
        except Exception as exc:
            await abort(context, exc)

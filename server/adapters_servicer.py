"""The Adapters gRPC service: load, replace, unload, list and describe adapters. No tensors here."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout

from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
from server.errors import FailedPrecondition, LoraplexError, Unavailable, status_for
from server.serving import Serving, abort, adapter_pool, ready, waiting_for_memory

log = logging.getLogger("loraplex.servicers")

KINDS = {"lora": pb.ADAPTER_KIND_LORA, "adalora": pb.ADAPTER_KIND_ADALORA, "hydralora": pb.ADAPTER_KIND_HYDRALORA,
         "reslora": pb.ADAPTER_KIND_RESLORA}


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.changing = adapter_pool("admin", 16)  # LoadAdapter/UnloadAdapter: they wait on ids and read files

    def _info(self, record, waiting: Counter | None = None) -> pb.AdapterInfo:
        """`waiting`: engine.waiting_for(), read once for a list of records."""
        engine = self.serving.engine
        bank = engine.bank
        waiting = engine.waiting_for() if waiting is None else waiting
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
            active_requests=bank.active_requests(record.adapter_id),
            waiting_requests=waiting[record.adapter_id] + waiting_for_memory(self.serving, record.adapter_id),
            heads=record.heads)

    async def _call(self, context, fn, *args):
        try:
            ready(self.serving)
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except Exception as exc:
            await abort(context, exc)

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
            ready(self.serving)
            if self.serving.unloading[request.adapter_id]:  # its unload would undo this load
                raise FailedPrecondition(f"adapter {request.adapter_id!r} is being unloaded by an UnloadAdapter with "
                                         f"drain; load it once that call returns")
            if request.replace:  # they arrived before it: they get the version they arrived under
                try:
                    await self._memory_waiters_in(self.serving, request.adapter_id)
                except asyncio.CancelledError:  # the caller's deadline or cancel: in the audit trail too
                    log.warning("LoadAdapter %r: cut while requests waited for adapter memory: not replaced",
                                request.adapter_id)
                    raise
            info = await self._changing_registry(lambda: self._info(self.serving.registry.load(
                request.adapter_id, request.replace, request.pin if request.HasField("pin") else None)))
        except Exception as exc:
            _refused("LoadAdapter", request.adapter_id, exc)
            await abort(context, exc)
            return
        # the operator's actions, in the log (an audit trail; failures are their status). A load's version is 1
        # unless it replaced one, whatever the request's `replace` said.
        log.info("LoadAdapter %r: version %d, %s, %s", info.adapter_id, info.version,
                 "replaced" if info.version > 1 else "loaded", "pinned" if info.pinned else "not pinned")
        return info

    async def UnloadAdapter(self, request, context):
        """Refuses while requests run on the adapter, unless `drain`: then the requests waiting for host memory for
        it go on to the engine first, the id is unloaded for new requests, and the call returns when the running
        ones have finished (bounded by the caller's deadline)."""
        try:
            s = ready(self.serving)
            if request.drain:
                try:
                    await self._let_memory_waiters_in(s, request.adapter_id)
                except asyncio.CancelledError:  # the caller's deadline or cancel: in the audit trail too
                    log.warning("UnloadAdapter %r: cut while requests waited for adapter memory: not unloaded",
                                request.adapter_id)
                    raise
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
            _refused("UnloadAdapter", request.adapter_id, exc)
            await abort(context, exc)

    async def _let_memory_waiters_in(self, s: Serving, adapter_id: str) -> None:
        """Before a drain unloads the id: the requests waiting for adapter host memory for it were accepted before
        the unload, so they go on (once memory is free) into the engine, where the drain waits for them as for the
        others, instead of finding the id gone. Meanwhile, with auto-load off, new requests for it are refused, as
        they will be once it is unloaded (with auto-load on they use it, as they would load it again)."""
        if not s.memory_waiting.get(adapter_id):
            return
        # NOT_FOUND / INVALID_ARGUMENT now, not after the wait (off the loop: it looks at the adapter root)
        await asyncio.get_running_loop().run_in_executor(None, s.registry.get, adapter_id)
        s.unloading[adapter_id] += 1  # once marked: any later one is refused
        try:
            await self._memory_waiters_in(s, adapter_id)
        finally:  # (new requests from now on resolve it, and are drained with the rest, until it is unloaded)
            s.unloading[adapter_id] -= 1
            if not s.unloading[adapter_id]:
                del s.unloading[adapter_id]

    @staticmethod
    async def _memory_waiters_in(s: Serving, adapter_id: str) -> None:
        """Until the requests waiting for adapter host memory for the id now have gone on into the engine, holding
        the version in memory, or left. Their adapter is resolved only then (they hold nothing while they wait), so
        a replace or an unload before would give them another version, or none."""
        waiting = set(s.memory_waiting.get(adapter_id, {}))
        while waiting & s.memory_waiting.get(adapter_id, {}).keys():  # each has reached the engine, or left
            await asyncio.sleep(0.02)
            ready(s)  # a shutdown ends the wait (the waiters are ended by it too)

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
                    ready(s)  # a dead engine or a shutdown ends the wait with UNAVAILABLE
            # and those waiting for host memory (a drain let those before it into the engine first, where they are
            # versions; any since are new requests, which find the id gone)
            waiting = 0 if request.drain else waiting_for_memory(s, request.adapter_id)
            in_flight = sum(versions.values()) + waiting
            if in_flight and not request.drain:
                plural = "s" * (in_flight != 1)
                raise FailedPrecondition(f"adapter {request.adapter_id!r} has {in_flight} request{plural} in flight "
                                         f"(running or waiting); set drain to unload it once they finish, or retry "
                                         f"later")
            s.registry.unload(request.adapter_id)
        return versions, in_flight

    async def ListAdapters(self, request, context):
        def answer():
            waiting = self.serving.engine.waiting_for()
            return pb.ListAdaptersResponse(adapters=[self._info(r, waiting) for r in self.serving.registry.records()])
        return await self._call(context, answer)

    async def GetAdapter(self, request, context):
        return await self._call(context, lambda: self._info(self.serving.registry.get(request.adapter_id)))


def _refused(method: str, adapter_id: str, exc: BaseException) -> None:
    """Refused adapter changes belong in the audit trail as much as the done ones (bugs are logged by abort)."""
    if isinstance(exc, LoraplexError):
        code, details = status_for(exc)
        log.warning("%s %r refused: %s: %s", method, adapter_id, code.name, details)

"""grpc_server_* metrics for every RPC (go-grpc-prometheus names and labels), the concurrent-RPC limit, and what
grpc's core logs of a call whose client has left.

The limit is enforced here rather than with grpc's `maximum_concurrent_rpcs`, whose refusal says only
"Concurrent RPC limit exceeded!": ours names the flag. Health checks and the operator's calls (the Adapters
service, GetServerInfo: short, and needed most when generation traffic is at its peak) are neither counted nor
refused; reflection streams are both."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.metrics import REQUEST_BUCKETS

UNLIMITED = ("/grpc.health.v1.Health/", "/loraplex.v1.Adapters/", "/loraplex.v1.Inference/GetServerInfo")
log = logging.getLogger("loraplex.interceptors")


class _Malformed:
    """A request message that does not parse (a string field that is not UTF-8, a corrupt body)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer):
    """grpc answers a message its deserializer cannot parse with UNKNOWN and the Python exception, logs an ERROR
    traceback, and runs no handler (so no metric counts the call): parsed here (by the outermost interceptor, whose
    handler's deserializer is the one grpc uses), a bad message travels on as _Malformed, counted and admitted like
    any call, through authentication, to MalformedInterceptor's refusal just before the servicer."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, whatever the implementation
            return _Malformed(exc)
    return parse


async def _refuse_malformed(request, context, method: str) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the {method} request message does not parse ({request.error}); string fields must be "
                            f"valid UTF-8, and messages nest within protobuf's depth limit (100)")


class MalformedInterceptor(grpc.aio.ServerInterceptor):
    """The innermost interceptor: a request message that did not parse (see _lenient) is INVALID_ARGUMENT here,
    after the call was counted, admitted under --max-concurrent-rpcs and authenticated (a call without a valid
    token is UNAUTHENTICATED whatever its body), never handed to a servicer."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.stream_unary:
            return handler
        method = details.method.rpartition("/")[2]
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                await _refuse_malformed(request, context, method)
                return await inner(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        bidi = handler.stream_stream is not None
        inner_stream = handler.stream_stream if bidi else handler.unary_stream

        async def checked(requests, context):
            async for request in requests:
                await _refuse_malformed(request, context, method)
                yield request

        async def stream(request, context):
            if not bidi:
                await _refuse_malformed(request, context, method)
            responses = inner_stream(checked(request, context) if bidi else request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:  # a handler that writes with context.write and returns (grpc_health's Watch)
                await responses
        wrap = grpc.stream_stream_rpc_method_handler if bidi else grpc.unary_stream_rpc_method_handler
        return wrap(stream, handler.request_deserializer, handler.response_serializer)


class _Stalled(Exception):
    """A stream's client took none of a message within --stream-stall-timeout."""


async def _write(context, response, stall: float) -> None:
    """Send one message of a stream; _Stalled if the client takes none of it within `stall` seconds. A write waits
    for the client's HTTP/2 flow-control window: a client that stops granting it while its connection stays healthy
    (a slow-read attack; a proxy whose own client stalls) held the call, its --max-concurrent-rpcs slot and its
    queued tokens for as long as the connection lived: one connection could take every slot. gRPC Python's client
    grants window as its transport reads, whatever the application reads, and a frozen client's connection is cut by
    its kernel (~20 s); a client whose window follows its application's reads (grpc-go, grpc-java) must have left a
    full window (64 KiB or more) unread this long."""
    try:
        async with asyncio.timeout(stall):
            await context.write(response)
    except TimeoutError:
        log.warning("a stream to %s took none of its messages for %s s (no HTTP/2 flow-control window): ended",
                    context.peer(), stall)
        raise _Stalled from None


def _cancel_code(context, budget: float | None) -> grpc.StatusCode:
    """Why a call ended early, from the time it had left (`budget`: what it had when it began here). A client whose
    deadline passes cancels the call as an explicit cancel does, before the server's own deadline, which started
    when the call arrived: later by its transit and queueing (7 ms for a 3 s deadline on one machine). So a call
    that ends with under 5% of its budget (at most 0.5 s) and 50 ms left counts as past its deadline; a cancel with
    more left is the client's (Ctrl-C, Stream.cancel)."""
    remaining = context.time_remaining()
    if budget is None or remaining is None:
        return grpc.StatusCode.CANCELLED
    slack = min(0.05 * budget, 0.5) + 0.05
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining <= slack else grpc.StatusCode.CANCELLED


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry, max_concurrent_rpcs: int, stall: float) -> None:
        self.limit = max_concurrent_rpcs
        self.stall = stall  # --stream-stall-timeout (_write)
        self.in_flight = 0  # counted RPCs now running; touched only on the event loop
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started.", labels, registry=registry)
        self.handled = Counter("grpc_server_handled", "RPCs completed, by status code.", labels + ["grpc_code"],
                               registry=registry)
        self.handling = Gauge("grpc_server_handling", "RPCs being handled now.", labels, registry=registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "RPC handling time.", labels,
                                 buckets=REQUEST_BUCKETS, registry=registry)
        self.sent = Counter("grpc_server_msg_sent", "Messages sent.", labels, registry=registry)
        self.received = Counter("grpc_server_msg_received", "Messages received.", labels, registry=registry)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.stream_unary:  # none of our services takes a client stream alone
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        counted = not details.method.startswith(UNLIMITED)
        if handler.unary_unary:
            labels = ("unary", service, method)
            inner = handler.unary_unary

            async def unary(request, context):
                code = self._begin(labels)
                start, budget = time.perf_counter(), context.time_remaining()
                try:
                    await self._admit(context, counted)
                    response = await inner(request, context)
                    self.sent.labels(*labels).inc()
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    code = _cancel_code(context, budget)
                    raise
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    self._end(labels, code, start, counted)
            return grpc.unary_unary_rpc_method_handler(unary, _lenient(handler.request_deserializer),
                                                       handler.response_serializer)
        # server streams (GenerateStream, health Watch) and bidirectional ones (reflection: counted and limited
        # like any other RPC, or a client could hold any number of them open)
        bidi = handler.stream_stream is not None
        labels = ("bidi_stream" if bidi else "server_stream", service, method)
        inner_stream = handler.stream_stream if bidi else handler.unary_stream

        async def stream(request, context):
            code = self._begin(labels, count_received=not bidi)
            start, budget = time.perf_counter(), context.time_remaining()
            try:
                await self._admit(context, counted)
                responses = inner_stream(self._counting(request, labels) if bidi else request, context)
                if hasattr(responses, "__aiter__"):
                    async with contextlib.aclosing(responses):  # closed here: a generation's row ends with it
                        async for response in responses:
                            await _write(context, response, self.stall)
                            self.sent.labels(*labels).inc()
                else:  # a handler that writes with context.write and returns (grpc_health's Watch)
                    await responses
                code = context.code() or grpc.StatusCode.OK
            except asyncio.CancelledError:  # the client left, or its deadline passed
                code = _cancel_code(context, budget)
                raise
            except _Stalled:  # no status can reach that client (it would wait behind the stuck message): the call
                code = grpc.StatusCode.RESOURCE_EXHAUSTED  # ends here, as a cancelled one does, and its slot is free
                raise asyncio.CancelledError from None
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._end(labels, code, start, counted)
        wrap = grpc.stream_stream_rpc_method_handler if bidi else grpc.unary_stream_rpc_method_handler
        return wrap(stream, _lenient(handler.request_deserializer), handler.response_serializer)

    async def _counting(self, requests, labels):
        async for request in requests:
            self.received.labels(*labels).inc()
            yield request

    def _begin(self, labels, count_received: bool = True) -> grpc.StatusCode:
        self.started.labels(*labels).inc()
        if count_received:
            self.received.labels(*labels).inc()
        self.handling.labels(*labels).inc()
        return grpc.StatusCode.UNKNOWN

    async def _admit(self, context, counted: bool) -> None:
        if not counted:
            return
        self.in_flight += 1
        if self.in_flight > self.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the server is handling its limit of {self.limit} concurrent RPCs "
                                f"(--max-concurrent-rpcs); retry later")

    def _end(self, labels, code: grpc.StatusCode, start: float, counted: bool) -> None:
        if counted:
            self.in_flight -= 1
        self.handling.labels(*labels).dec()
        self.handled.labels(*labels, code.name).inc()
        self.seconds.labels(*labels).observe(time.perf_counter() - start)


def client_gone(record: logging.LogRecord) -> bool:
    """A logging filter for grpc's core: the reply to a client that has just left (cancel, deadline, dropped
    connection) cannot be sent, and grpc logs that as an ERROR with a traceback of its own internals (about once in
    40,000 calls under churn). It is the client's leaving, already counted as CANCELLED: one WARNING line instead, so
    that alerts on ERROR lines stay meaningful."""
    message = record.getMessage()
    if record.levelno == logging.ERROR and message.startswith("ExecuteBatchError raised in core by servicer method"):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"{message.split('method ', 1)[1]}: the reply could not be sent (the client had left)", None, None, None)
    return True

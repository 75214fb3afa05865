"""grpc_server_* metrics for every RPC (go-grpc-prometheus names and labels)."""
from __future__ import annotations

import asyncio
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.metrics import REQUEST_BUCKETS


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry) -> None:
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
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary:
            labels = ("unary", service, method)
            inner = handler.unary_unary

            async def unary(request, context):
                code = self._begin(labels)
                start = time.perf_counter()
                try:
                    response = await inner(request, context)
                    self.sent.labels(*labels).inc()
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    code = _cancel_code(context)
                    raise
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    self._end(labels, code, start)
            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        labels = ("server_stream", service, method)
        inner_stream = handler.unary_stream

        async def stream(request, context):
            code = self._begin(labels)
            start = time.perf_counter()
            try:
                async for response in inner_stream(request, context):
                    self.sent.labels(*labels).inc()
                    yield response
                code = context.code() or grpc.StatusCode.OK
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._end(labels, code, start)
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)

    def _begin(self, labels) -> grpc.StatusCode:
        self.started.labels(*labels).inc()
        self.received.labels(*labels).inc()
        self.handling.labels(*labels).inc()
        return grpc.StatusCode.UNKNOWN

    def _end(self, labels, code: grpc.StatusCode, start: float) -> None:
        self.handling.labels(*labels).dec()
        self.handled.labels(*labels, code.name).inc()
        self.seconds.labels(*labels).observe(time.perf_counter() - start)

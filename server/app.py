"""Assemble and run the server: grpc.aio front end, health, reflection, metrics, engine; drain on SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters.slot_bank import SlotBank
from loader.base_model import load_base_model
from loader.default_model import default_adapter_root
from loader.inject import ALL_LINEAR, base_weight, inject
from loader.peft_files import read_adapter
from loader.registry import AdapterRegistry
from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.engine import Engine, EngineConfig, EngineRequest, ErrorEvent, FinishEvent
from server.batch import Runner
from server.interceptors import MetricsInterceptor
from server.metrics import Metrics
from server.sampling import SamplingParams
from server.servicers import AdaptersServicer, InferenceServicer, Serving
from server.stopping import StoppingParams

log = logging.getLogger("loraplex.app")
SERVICES = [pb.DESCRIPTOR.services_by_name["Inference"].full_name, pb.DESCRIPTOR.services_by_name["Adapters"].full_name]


@dataclass
class Ports:
    grpc: int
    metrics: int


def run_isolated(fn, *args):
    """Run `fn` on a fresh thread that exits afterwards, and return its result (or raise its error).

    torch's GNU OpenMP keeps a worker pool per thread that ever ran parallel code. A long-lived executor
    thread that loaded the model or folded adapter tensors would keep a second pool next to the engine's;
    on a 2-core machine that oversubscription throttled every decode step (adapter batches 0.80 -> 0.70 of
    the base throughput, bench/RESULTS.md). So only the engine thread lives long and runs torch.
    """
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc
    thread = threading.Thread(target=target, name=f"loraplex-{getattr(fn, '__name__', 'task')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def build_serving(config: ServerConfig, metrics: Metrics) -> Serving:
    """Load the model, inject adapter layers, allocate the slot bank, start the engine (blocking)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    base = load_base_model(config.model, config.device, config.dtype)
    targets = ALL_LINEAR if config.target_modules == ALL_LINEAR else config.target_modules.split(",")
    context, shapes = inject(base.model, targets)
    dtype = next(base.model.parameters()).dtype
    bank = SlotBank(shapes, config.max_active_adapters, config.max_lora_rank, torch.device(config.device), dtype,
                    config.max_hydra_heads)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    engine = Engine(runner, base.tokenizer, base.eos_token_ids,
                    EngineConfig(config.max_batch_size, config.max_queue_size), metrics)
    by_name = {s.name: s for s in shapes}

    def read(path: Path, adapter_id: str, serial: int):
        start = time.monotonic()
        result = "error"
        try:
            adapter = run_isolated(lambda: read_adapter(
                path, adapter_id, by_name, config.max_lora_rank, serial, config.max_hydra_heads,
                base_weight=lambda name: base_weight(base.model, name)))
            result = "ok"
            return adapter
        finally:
            metrics.adapter_load.labels(result).observe(time.monotonic() - start)

    root = Path(config.adapter_root) if config.adapter_root else None
    if root is None and config.model == "default":
        root = default_adapter_root()  # the built-in model comes with its demo adapters
    registry = AdapterRegistry(root, read, config.adapter_cache_bytes, config.autoload_adapters,
                               on_evict=lambda adapter: engine.call(lambda: bank.forget(adapter.key)),
                               on_change=lambda memory, disk: (metrics.adapters_loaded.labels("cpu").set(memory),
                                                               metrics.adapters_loaded.labels("disk").set(disk)))
    engine.start()
    _warm_up(engine, base)
    return Serving(engine=engine, registry=registry, base=base, config=config, metrics=metrics)


def _warm_up(engine: Engine, base) -> None:
    """One real generation through the engine before reporting SERVING."""
    done = threading.Event()
    outcome: list = []

    def sink(event):
        if isinstance(event, (FinishEvent, ErrorEvent)):
            outcome.append(event)
            done.set()
    bos = base.tokenizer.bos_token_id
    engine.submit(EngineRequest("warmup", [bos if bos is not None else base.pad_token_id], None,
                                SamplingParams(), StoppingParams(2, (), True), sink))
    if not done.wait(timeout=600) or isinstance(outcome[0], ErrorEvent):
        raise RuntimeError(f"engine warm-up failed: {outcome[0].error if outcome else 'timed out'}")


async def serve(config: ServerConfig, on_ready=None, stop_event: asyncio.Event | None = None,
                on_listening=None) -> None:
    """Run until SIGTERM/SIGINT (or `stop_event`). `on_listening(ports)` is called once the ports are bound
    (health still NOT_SERVING), `on_ready(ports)` once the model is warm and health says SERVING."""
    metrics = Metrics(config.max_batch_size)
    metrics_port = metrics.serve(config.metrics_host, config.metrics_port)
    serving = Serving()
    server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics.registry)],
                             maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(serving), server)
    pb_grpc.add_AdaptersServicer_to_server(AdaptersServicer(serving), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # The aio health servicer starts with "" SERVING: say NOT_SERVING until the model is warm.
    for name in ["", *SERVICES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if config.reflection:
        reflection.enable_server_reflection([*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    log.info("grpc listening on %s:%d, metrics on %s:%d", config.host, port, config.metrics_host, metrics_port)
    if on_listening is not None:
        on_listening(Ports(port, metrics_port))

    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    loaded = await loop.run_in_executor(None, run_isolated, build_serving, config, metrics)
    serving.__dict__.update(loaded.__dict__)
    for name in ["", *SERVICES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("model %s ready (%s, %s)", config.model, config.device, config.dtype)
    if on_ready is not None:
        on_ready(Ports(port, metrics_port))

    await stop.wait()
    log.info("draining: health NOT_SERVING, new calls UNAVAILABLE, %.0fs grace", config.grace_period)
    await health_servicer.enter_graceful_shutdown()
    serving.engine.draining = True
    deadline = time.monotonic() + config.grace_period
    while not serving.engine.idle() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(max(0.0, deadline - time.monotonic()))
    serving.engine.stop()
    log.info("stopped")


class BackgroundServer:
    """The real server on its own event loop thread (tests, benchmarks)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.ports: Ports | None = None  # set once bound; `start` returns when the model is ready
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="loraplex-server", daemon=True)

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.config, on_ready=lambda ports: self._ready.set(), stop_event=self._stop,
                        on_listening=self._on_listening)
        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def _on_listening(self, ports: Ports) -> None:
        self.ports = ports

    def start(self, timeout: float = 300) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.ports.grpc}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

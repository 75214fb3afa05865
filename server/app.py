"""Assemble and run the server: grpc.aio front end, health, reflection, metrics, engine; drain on SIGTERM."""
from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from adapters import cpu_kernel, triton_kernel
from adapters.slot_bank import SlotBank, narrowest
from loader.base_model import UnservableModel, load_base_model, slow_dtype_warning
from loader.default_model import default_adapter_root
from loader.inject import base_weight, inject, unmatched_problem
from loader.key_layout import key_layout
from loader.lora_files import ResidualCache
from loader.peft_files import read_adapter
from loader.registry import AdapterRegistry
from loader.state_file import UnreadableStateFile
from protos.loraplex.v1 import inference_pb2 as pb
from protos.loraplex.v1 import inference_pb2_grpc as pb_grpc
from server.attention import UnsupportedAttention
from server.auth import AuthInterceptor, watch_tokens
from server.tls import tls_credentials
from server.config import (ConfigError, ServerConfig, check_config, check_slot_bank, free_memory, resolve_limits,
                           serve_targets, size_text)
from server.engine import Engine, EngineConfig
from server.engine_messages import EngineRequest, ErrorEvent, FinishEvent
from server.open_streams import Closing, HealthService, ReflectionService
from server.errors import Unavailable
from server.batch import Runner
from server.prefix_cache import PrefixCache
from server.response_format import Formats
from server.interceptors import MalformedInterceptor, MetricsInterceptor, client_gone
from server.kv_budget import kv_limits
from server.metrics import Metrics
from server.sampling import SamplingParams
from server.adapters_servicer import AdaptersServicer
from server.servicers import InferenceServicer
from server.serving import Serving
from server.stopping import StoppingParams

log = logging.getLogger("loraplex.app")
SERVICES = [pb.DESCRIPTOR.services_by_name["Inference"].full_name, pb.DESCRIPTOR.services_by_name["Adapters"].full_name]


HANDLER_GRACE = 2.0  # seconds the open handlers get to send their status once a shutdown's grace is over
REPLY_GRACE = 0.5  # seconds the last replies get to leave once no Inference/Adapters handler runs any more
STATE_FILE = ".loraplex-state.json"  # ids must start with a letter or digit, so this is never an adapter


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


def adapter_kernel(config: ServerConfig) -> str:
    """--adapter-kernel resolved before anything is loaded: native where it can run, else torch (a ConfigError
    when native was asked for by name). Builds the kernel on its first use on this machine (about a second)."""
    factors = config.dtype if config.adapter_dtype == "auto" else config.adapter_dtype
    if config.adapter_kernel == "triton":
        why = triton_kernel.problem(torch.device(config.device))
        if why:
            raise ConfigError(f"--adapter-kernel triton cannot run: {why}")
        log.info("adapter kernel: triton, %s factors", factors)
        return "triton"
    if config.adapter_kernel == "torch":
        why = "--adapter-kernel torch"
    elif not config.device.startswith("cpu") or config.dtype != "float32":
        why = f"it computes on the CPU in float32 (here {config.device}, {config.dtype})"
    else:
        why = cpu_kernel.available()
    if why is None:
        log.info("adapter kernel: native CPU kernel (%s), %s factors", cpu_kernel.isa().name, factors)
        return "native"
    if config.adapter_kernel == "native":
        raise ConfigError(f"--adapter-kernel native cannot run: {why}")
    log.info("adapter kernel: torch, %s factors (native CPU kernel not used: %s)", factors, why)
    return "torch"


def _out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError is a RuntimeError, and so is the CPU allocator's "not enough memory"."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "memory" in str(exc) or "allocate" in str(exc)


def _prefix_cache(config: ServerConfig, tokens: int, runner: Runner, layers: list) -> PrefixCache | None:
    """The prefix cache's pools of `tokens` (Limits.prefix_cache_tokens) for a row of `layers` (Runner.row_layout),
    allocated now: a size the device cannot hold is refused at start."""
    if not tokens:
        return None
    if runner.longrope is not None:
        raise ConfigError("--prefix-cache-tokens: a LongRoPE model's keys depend on the whole prompt's length (its "
                          "short or long rotary factors), not on the tokens before them alone; serve it without")
    needed = tokens * PrefixCache.bytes_per_token(layers)
    size, free = size_text(needed), free_memory(config.device)
    try:
        if free is not None and needed > free:
            raise MemoryError(f"only {size_text(free)} free")
        cache = PrefixCache(tokens, layers, runner.device)
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        raise ConfigError(f"--prefix-cache-tokens {config.prefix_cache_tokens} needs {size} on {config.device}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'out of memory'}; lower it") from None
    log.info("prefix cache: %d tokens, %s", tokens, size)
    return cache


def build_serving(config: ServerConfig, metrics: Metrics, kernel: str) -> Serving:
    """Load the model, inject adapter layers, allocate the slot bank, start the engine (blocking)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cpu"):  # the two settings that decide CPU throughput, and how to change them
        waits = " ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
        log.info("torch CPU threads: %d (--threads); OpenMP waits: %s", torch.get_num_threads(), waits)
    slow = slow_dtype_warning(config.device, config.dtype)
    if slow:
        log.warning("%s", slow)
    before = free_memory(config.device)  # what the model and the rest take of it bounds the KV cache (kv_limits)
    try:
        base = load_base_model(config.model, config.device, config.dtype)
    except (FileNotFoundError, UnservableModel) as exc:
        raise ConfigError(f"--model: {exc}") from None
    if base.max_token_chars is None:
        log.info("prompt texts are tokenized whole before their length is checked: this tokenizer may drop or fuse "
                 "characters, so their count bounds no token count (gRPC's 4 MiB message limit still applies)")
    targets = serve_targets(config)  # read as `loraplex train` reads it
    problem = unmatched_problem(base.model, targets)
    try:
        context, shapes = inject(base.model, targets)
    except ValueError as exc:  # nothing at all to adapt
        raise ConfigError(problem or f"--target-modules: {exc}") from None
    if problem:  # only warned (5986d91): a list shared across model families may name modules this one lacks
        log.warning("%s; adapters targeting them are refused", problem)
    dtype = next(base.model.parameters()).dtype
    factor_dtype = dtype if config.adapter_dtype == "auto" else getattr(torch, config.adapter_dtype)
    size, bank_bytes = check_slot_bank(config, [(s.d_in, s.d_out) for s in shapes], factor_dtype.itemsize,
                                       free_memory(config.device))
    log.info("adapter slot bank: %s", size)
    try:
        bank = SlotBank(shapes, config.max_active_adapters, config.max_lora_rank, torch.device(config.device),
                        factor_dtype, config.max_hydra_heads, kernel, dtype)
    except (MemoryError, RuntimeError) as exc:  # free memory shrank since it was measured
        if not _out_of_memory(exc):
            raise
        raise ConfigError(f"the adapter slot bank ({size}) cannot be allocated on {config.device}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'out of memory'}; lower --max-active-adapters, "
                          f"--max-lora-rank or --max-hydra-heads") from None
    try:
        runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
        runner.check_cache()
    except UnsupportedAttention as exc:
        raise ConfigError(f"--model: {exc}") from None
    limits = resolve_limits(config, base.max_context)
    layers = runner.row_layout()  # a row's keys and values per layer: what the prefix cache and KV budget are made of
    prefixes = _prefix_cache(config, limits.prefix_cache_tokens, runner, layers)
    model_bytes = sum(t.numel() * t.element_size() for t in [*base.model.parameters(), *base.model.buffers()])
    root = Path(config.adapter_root) if config.adapter_root else None
    if root is None and config.model == "default":
        root = default_adapter_root()  # the built-in model comes with its demo adapters
    # on the CPU the adapters read from disk share the KV cache's memory (with no adapter root, none is read)
    host_cache = config.adapter_cache_bytes if root is not None and torch.device(config.device).type == "cpu" else 0
    limits = kv_limits(config, PrefixCache.bytes_per_token(layers), limits,  # after everything else is allocated
                       free_memory(config.device), before, model_bytes + bank_bytes, host_cache)
    engine = Engine(runner, base.tokenizer, base.eos_token_ids,
                    EngineConfig(config.max_batch_size, config.max_queue_size, limits.max_kv_tokens,
                                 config.max_prefill_tokens, config.scheduling, config.max_queue_per_adapter,
                                 config.preemption), metrics,
                    prefixes)
    by_name = {s.name: s for s in shapes}
    layout = key_layout(base.model)  # older module names renamed as PEFT does; a vision tower's tensors left out
    residuals = ResidualCache()  # PiSSA/OLoRA terms: an adapter read again after an eviction takes no SVD again

    def read(path: Path, adapter_id: str, serial: int):
        start = time.monotonic()
        result = "error"
        try:
            adapter = run_isolated(lambda: read_adapter(
                path, adapter_id, by_name, config.max_lora_rank, serial, config.max_hydra_heads,
                base_weight=lambda name: base_weight(base.model, name), max_bytes=config.max_adapter_bytes,
                factor_dtype=narrowest(factor_dtype, bank.delta_dtype), residuals=residuals, layout=layout))
            result = "ok"
            return adapter
        finally:
            metrics.adapter_load.labels(result).observe(time.monotonic() - start)

    registry = AdapterRegistry(root, read, config.adapter_cache_bytes, config.autoload_adapters,
                               on_evict=lambda adapter: engine.call(lambda: bank.forget(adapter.key)),
                               on_change=lambda memory, disk: (metrics.adapters_loaded.labels("cpu").set(memory),
                                                               metrics.adapters_loaded.labels("disk").set(disk)),
                               state_file=_state_file(config, root))
    try:
        registry.restore()  # adapters loaded at run time before a restart; health says SERVING only after this
    except UnreadableStateFile as exc:
        raise ConfigError(str(exc)) from None
    engine.start()
    _warm_up(engine, base, metrics)
    return Serving(engine=engine, registry=registry, base=base, config=config, metrics=metrics, limits=limits,
                   formats=Formats(base.tokenizer, base.eos_token_ids, base.vocab_size, metrics))


def _state_file(config: ServerConfig, root: Path | None) -> Path | None:
    if config.state_file:
        return Path(config.state_file)
    return root / STATE_FILE if root is not None else None


def _warm_up(engine: Engine, base, metrics: Metrics) -> None:
    """One real generation through the engine before reporting SERVING, counted in a scratch registry: operators'
    latency and request metrics start with the first client's request."""
    engine.metrics = Metrics(engine.config.max_batch_size)
    try:
        _generate_once(engine, base)
        while not engine.idle():  # its row retired, so no step records into the scratch registry after the swap
            time.sleep(0.001)
    finally:
        engine.metrics = metrics


def _generate_once(engine: Engine, base) -> None:
    done = threading.Event()
    outcome: list = []

    def sink(event):
        if isinstance(event, (FinishEvent, ErrorEvent)):
            outcome.append(event)
            done.set()
    bos = base.tokenizer.bos_token_id
    first = bos if bos is not None and bos < base.vocab_size else base.pad_token_id  # pad_token_id: always valid
    engine.submit(EngineRequest("warmup", [first], None,
                                SamplingParams(), StoppingParams(2, (), True), sink))
    if not done.wait(timeout=600) or isinstance(outcome[0], ErrorEvent):
        raise RuntimeError(f"engine warm-up failed: {outcome[0].error if outcome else 'timed out'} (a one-token "
                           f"generation on the base model; the traceback is logged above: an architecture whose forward "
                           f"fails here is not one this server runs)")


async def serve(config: ServerConfig, on_ready=None, stop_event: asyncio.Event | None = None,
                on_listening=None, serving: Serving | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop_event`). `on_listening(ports)` is called once the ports are bound
    (health still NOT_SERVING), `on_ready(ports)` once the model is warm and health says SERVING. `serving`,
    when given, is filled in with the live parts (tests reach the engine through it)."""
    check_config(config)
    grpc_core_log = logging.getLogger("grpc._cython.cygrpc")
    if client_gone not in grpc_core_log.filters:
        grpc_core_log.addFilter(client_gone)
    kernel = adapter_kernel(config)
    user_tokens = watch_tokens(config.auth_token_file, "--auth-token-file") if config.auth_token_file else None
    admin_tokens = watch_tokens(config.admin_token_file, "--admin-token-file") if config.admin_token_file else None
    metrics = Metrics(config.max_batch_size)
    try:
        metrics_port = metrics.serve(config.metrics_host, config.metrics_port)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port} (--metrics-port): "
                          f"{exc.strerror}") from None
    serving = serving if serving is not None else Serving()
    serving.metrics = metrics  # before the model: calls refused while it loads are counted too
    # Outermost first: every RPC is counted (refused ones too), then authenticated.
    interceptors = [MetricsInterceptor(metrics.registry, config.max_concurrent_rpcs, config.stream_stall_timeout)]
    if user_tokens or admin_tokens:
        interceptors.append(AuthInterceptor(user_tokens, admin_tokens, reflection_open=config.reflection))
    interceptors.append(MalformedInterceptor())  # innermost: after counting, admission and authentication
    # grpcio sets SO_REUSEPORT by default: a second server on a busy port would bind too and take part of its calls
    # Calls that arrive at once wait in grpc's own queue until the event loop takes them; beyond its limit (1000 by
    # default, rejecting at random from there) grpc cancels them, CANCELLED, before any interceptor counts them: a
    # burst of 2000 calls lost ~10% that way. Ours refuses beyond --max-concurrent-rpcs, naming the flag, so grpc's
    # queue only has to hold a burst of that size and more.
    pending = min(2 ** 31 - 1, max(3000, 4 * config.max_concurrent_rpcs))  # grpc's hard default 3000; a C int
    # A stream ended for want of its client's flow-control window (interceptors._write) stays open in grpc's core
    # until its connection closes (2.5 KB each; Python cannot reset it): one connection may hold as many streams as
    # grpc's queue holds calls, so a client that stalls its streams on purpose holds a bounded amount, and a burst
    # on one channel is still answered (grpc refuses streams beyond this UNAVAILABLE).
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.so_reuseport", 0), ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending), ("grpc.max_concurrent_streams", pending)])
    if (user_tokens or admin_tokens) and not config.tls_cert:
        log.warning("bearer tokens travel in plaintext without --tls-cert/--tls-key: use TLS beyond localhost")
    if not (user_tokens or admin_tokens) and not _loopback(config.host):
        log.warning("serving on %s without --auth-token-file: anyone who reaches the port can generate and load or "
                    "unload adapters (LoadAdapter/UnloadAdapter); set --auth-token-file/--admin-token-file, or bind "
                    "127.0.0.1 behind a proxy that authenticates", config.host)
    inference, adapters = InferenceServicer(serving), AdaptersServicer(serving)
    pb_grpc.add_InferenceServicer_to_server(inference, server)
    pb_grpc.add_AdaptersServicer_to_server(adapters, server)
    streams = Closing()
    health_servicer = HealthService(streams)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # The aio health servicer starts with "" SERVING: say NOT_SERVING until the model is warm.
    for name in ["", *SERVICES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if config.reflection:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionService(
            [*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], streams), server)
    address = f"{config.host}:{config.port}"
    credentials = tls_credentials(config, metrics.certificate_expires) if config.tls_cert else None
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind"
        raise ConfigError(f"cannot listen on {address} (--host/--port): the port is in use, or the address is not "
                          f"one of this machine's") from None
    stop = stop_event or asyncio.Event()
    hurry = asyncio.Event()  # a second signal: the grace period is not waited for

    def on_signal() -> None:
        if stop.is_set() and not hurry.is_set():
            log.warning("second signal: ending the requests in flight now, without waiting for the grace period")
            hurry.set()
        stop.set()
    loop = asyncio.get_running_loop()
    # On the main thread the process is this server's (`loraplex serve`): it takes the signals and freezes the heap;
    # an in-process server (tests, benchmarks) runs on a thread of its own and does neither.
    owns_process = threading.current_thread() is threading.main_thread()
    if owns_process:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
    await server.start()  # after the signal handlers: a SIGTERM once the port is announced is a drain
    log.info("grpc listening on %s:%d (%s%s), metrics on %s:%d", config.host, port,
             "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext",
             ", bearer tokens required" if user_tokens else "", config.metrics_host, metrics_port)
    if on_listening is not None:
        on_listening(Ports(port, metrics_port))

    building = loop.run_in_executor(None, run_isolated, build_serving, config, metrics, kernel)
    try:
        hurried = asyncio.ensure_future(hurry.wait())
        await asyncio.wait([building, hurried], return_when=asyncio.FIRST_COMPLETED)
        if not building.done():  # a second signal: the model load cannot be interrupted, the process can
            _exit_now("a second signal while the model loads: exiting without waiting for it", 1)
        hurried.cancel()
        loaded = building.result()
    except BaseException:
        await server.stop(None)
        raise
    serving.__dict__.update(loaded.__dict__)
    if owns_process:
        log.info("garbage collector: %d objects alive at start frozen out of its full collections", freeze_heap())
    if not stop.is_set():  # a signal while loading: never announced SERVING, straight to the shutdown
        for name in ["", *SERVICES]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("model %s ready (%s, %s)", config.model, config.device, config.dtype)
        if on_ready is not None:
            on_ready(Ports(port, metrics_port))

    watchdog = asyncio.create_task(_watch_engine(serving.engine, health_servicer, stop))
    await stop.wait()
    watchdog.cancel()
    log.info("draining: health NOT_SERVING, new calls UNAVAILABLE, %gs grace", config.grace_period)
    deadline = time.monotonic() + config.grace_period
    await health_servicer.enter_graceful_shutdown()
    await _between_steps(serving.engine.drain(Unavailable(
        "the server is shutting down and this request had not started; retry on another replica")), deadline)
    while not serving.engine.idle() and time.monotonic() < deadline and not hurry.is_set():
        await asyncio.sleep(0.05)
    if not serving.engine.idle():
        why = "a second signal" if hurry.is_set() else f"--grace-period {config.grace_period:g}s ran out"
        cut = Unavailable(f"the server shut down before this request finished ({why}); retry on another replica")
        log.info("grace period over: ending the requests still in flight with UNAVAILABLE")
        await _between_steps(serving.engine.fail_in_flight(cut), time.monotonic())
    # The handlers still open have just been told their status (or were never the engine's, e.g. a LoadAdapter
    # reading a file): they get a moment to send it before the transport cuts them. Only Inference and Adapters calls
    # are waited for: server.stop(grace) waits for every open call, and a health Watch (load balancers keep one
    # open) or a reflection stream never ends by itself, so an idle server took the whole grace period to exit.
    cut_at = time.monotonic() + (HANDLER_GRACE if hurry.is_set() else max(HANDLER_GRACE, deadline - time.monotonic()))
    while _service_calls(interceptors[0]) and time.monotonic() < cut_at:
        if hurry.is_set():
            cut_at = min(cut_at, time.monotonic() + HANDLER_GRACE)
        await asyncio.sleep(0.05)
    left = max(0.0, cut_at - time.monotonic())
    streams.close()  # health Watch and reflection streams end now, within the stop's grace, not cut at the exit
    await server.stop(left if _service_calls(interceptors[0]) else min(left, REPLY_GRACE))
    if serving.registry_changes.count:  # cut by the transport: their clients heard UNAVAILABLE, so they must not count
        log.warning("%d LoadAdapter/UnloadAdapter calls were cut by the shutdown; the adapter state file keeps what it "
                    "held before them", serving.registry_changes.count)
        serving.registry.freeze_state()
    serving.engine.stop()
    for pool in (inference.resolving, adapters.changing):  # threads still reading a file finish on their own
        pool.shutdown(wait=False, cancel_futures=True)
    if owns_process:  # the exit's collection skips frozen objects: triton's bindings then report what it left as leaks
        gc.unfreeze()
    log.info("stopped")
    if hurry.is_set() and serving.registry_changes.count:  # asyncio.run would wait for their threads' file reads
        _exit_now("a second signal: not waiting for the cut LoadAdapter/UnloadAdapter reads", 0)


def freeze_heap() -> int:
    """Collect once, then move every object alive into the garbage collector's permanent generation, and return how
    many. Its full collections otherwise walk the ~400k objects torch, transformers and the model leave, each ~0.2-0.4
    s with the GIL held: every stream's next token waits (bench/gc_pauses.py); after this they walk only the objects
    made since. What is frozen is never collected, which is what start-up objects are for: the server's life."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _exit_now(why: str, code: int) -> None:
    """Only after a second signal (signals are handled on the main thread only, so never in tests' servers)."""
    log.warning(why)
    logging.shutdown()
    os._exit(code)


async def _between_steps(future, deadline: float) -> None:
    """Wait for an engine call made while shutting down, until `deadline` (time.monotonic) and HANDLER_GRACE more:
    a stopped engine (its requests already failed) or one stuck in a step must not stop the shutdown."""
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()) + HANDLER_GRACE)
    except Exception as exc:  # TimeoutError too: the transport ends the calls instead
        log.warning("shutting down without the engine: %s", exc or type(exc).__name__)


def _service_calls(interceptor: MetricsInterceptor) -> float:
    """Inference and Adapters calls whose handlers run now (the grpc_server_handling gauge; health and reflection
    streams are not among them)."""
    return sum(sample.value for metric in interceptor.handling.collect() for sample in metric.samples
               if sample.labels.get("grpc_service") in SERVICES)


def _loopback(host: str) -> bool:
    """Whether `host` (a --host value) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


async def _watch_engine(engine: Engine, health_servicer, stop: asyncio.Event) -> None:
    """If the engine thread ever dies, say so to load balancers: every service turns NOT_SERVING."""
    while not stop.is_set():
        if not engine.alive:
            log.critical("the engine thread has died; health is NOT_SERVING and calls get UNAVAILABLE")
            for name in ["", *SERVICES]:
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            return
        await asyncio.sleep(0.1)

"""Server configuration: one frozen dataclass, built from command-line flags."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    model: str = "default"
    adapter_root: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    device: str = "cpu"
    dtype: str = "float32"
    adapter_kernel: str = "auto"     # auto: native on a CPU with AVX-512 or AVX2 where it builds, else torch
    adapter_dtype: str = "auto"      # how slot factors are stored; auto: the model's dtype
    max_batch_size: int = 32
    max_active_adapters: int = 32
    max_lora_rank: int = 64
    max_hydra_heads: int = 8
    max_queue_size: int = 256
    max_queue_per_adapter: int = 0   # 0: no limit of an adapter's own, only --max-queue-size
    scheduling: str = "fair"         # the order waiting requests are admitted in: fair between adapters, or fifo
    preemption: bool = True          # fair: an adapter's rows above its share of a full batch give way to others'
    max_concurrent_rpcs: int = 1024
    default_max_new_tokens: int = 64
    max_prompt_tokens: int = 0       # 0: the model's context length
    max_new_tokens: int = 0          # 0: the model's context length
    max_kv_tokens: int = 0           # 0: max_batch_size x the model's context length, within free memory (KV_SHARE)
    max_prefill_tokens: int = 2048   # padded prompt tokens a step may prefill (a longer prompt: in chunks)
    prefix_cache_tokens: int = 0     # tokens of computed keys and values kept for later prompts (0: none)
    max_adapter_bytes: int = 1 << 30
    auth_token_file: str | None = None
    admin_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    state_file: str | None = None    # None: <adapter root>/.loraplex-state.json
    adapter_cache_bytes: int = 2 << 30
    autoload_adapters: bool = True
    target_modules: str = "all-linear"
    reflection: bool = True
    grace_period: float = 30.0
    stream_stall_timeout: float = 30.0  # seconds a stream's message may wait for its client's flow-control window
    threads: int = 0
    log_level: str = "INFO"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="local Hugging Face causal-LM directory, or 'default' (built-in model)")
    a("--adapter-root", default=d.adapter_root, help="directory holding one sub-directory per adapter id")
    a("--host", default=d.host, help="address the gRPC port binds (0.0.0.0: every interface)")
    a("--port", type=int, default=d.port, help="gRPC port (0 picks a free one)")
    a("--metrics-host", default=d.metrics_host, help="address the Prometheus port binds")
    a("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port (0 picks a free one)")
    a("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    a("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"], help="the model's weights and compute")
    a("--adapter-kernel", default=d.adapter_kernel, choices=["auto", "native", "torch", "triton"],
      help="how adapter deltas are computed: native (CPU with AVX-512 or AVX2, float32 model; built with the system C "
           "compiler on first use), torch (batched matmuls, any device), triton (CUDA GPUs with triton installed: one "
           "launch per adapted module and decode step; not yet measured on a GPU, so auto does not pick it), "
           "auto (native where it runs, else torch)")
    a("--adapter-dtype", default=d.adapter_dtype, choices=["auto", "float32", "bfloat16", "float16"],
      help="dtype adapter factors are stored in on the device (auto: the model's); with the native kernel "
           "bfloat16 or float16 halve the bytes each decode step reads, rounding the (scaled) factors to 8 or 11 "
           "significant bits; the arithmetic is the model's dtype's, float32 for float32 factors (on a "
           "bfloat16/float16 model too, as PEFT computes adapters)")
    a("--max-batch-size", type=int, default=d.max_batch_size, help="rows per forward pass")
    a("--max-active-adapters", type=int, default=d.max_active_adapters, help="device adapter slots")
    a("--max-lora-rank", type=int, default=d.max_lora_rank,
      help="slot width: the largest adapter rank (HydraLoRA: heads x rank) accepted")
    a("--max-hydra-heads", type=int, default=d.max_hydra_heads, help="largest HydraLoRA head count accepted")
    a("--max-queue-size", type=int, default=d.max_queue_size, help="waiting requests before RESOURCE_EXHAUSTED")
    a("--max-queue-per-adapter", type=int, default=d.max_queue_per_adapter,
      help="waiting requests one adapter (the base model counts as one) may have before its next is "
           "RESOURCE_EXHAUSTED, so one client's flood cannot fill the queue that others' requests need (0: no limit "
           "but --max-queue-size)")
    a("--scheduling", default=d.scheduling, choices=["fair", "fifo"],
      help="the order waiting requests get rows in: fair (each adapter, the base model as one, gets its share of the "
           "rows, counted in tokens served, however many requests others send; one adapter's in arrival order) "
           "or fifo (arrival order)")
    a("--no-preemption", dest="preemption", action="store_false",
      help="with --scheduling fair, never preempt: by default, while every row is taken and the next request is of an "
           "adapter holding fewer than its share of the rows, a row of the adapter holding the most, above its share, "
           "waits again (its tokens kept) and resumes where it stopped when a row is its again")
    a("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs,
      help="RPCs in flight before RESOURCE_EXHAUSTED (not counted: health checks, the Adapters service, "
           "GetServerInfo)")
    a("--default-max-new-tokens", type=int, default=d.default_max_new_tokens,
      help="what a request that sets no max_new_tokens gets (within the room its prompt leaves)")
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt accepted (0: context)")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="largest max_new_tokens accepted (0: context)")
    a("--max-kv-tokens", type=int, default=d.max_kv_tokens,
      help="KV-cache capacity in token slots (rows x cached positions) that running requests may reserve; "
           f"requests wait for room (0: max-batch-size x context, at most what fits in {round(100 * KV_SHARE)}%% of "
           f"the memory free once the model, the adapter slot bank and the prefix cache are allocated, on the CPU "
           f"less --adapter-cache-bytes)")
    a("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
      help="prompt tokens (rows x longest prompt, as padded) one step prefills; later arrivals wait for the "
           "next step, and a longer prompt is prefilled alone, this many tokens a step (shorter requests still join "
           "meanwhile), so running streams get a token between two such chunks, never wait for a whole long prompt")
    a("--prefix-cache-tokens", type=int, default=d.prefix_cache_tokens,
      help="tokens of keys and values kept, on the model's device, of the prompts and generated text requests ran, "
           "per adapter version: a later prompt starting with 16 or more of them (a system prompt, a chat's earlier "
           "turns) copies them instead of running them; allocated at start, least recently used out (0: none)")
    a("--max-adapter-bytes", type=int, default=d.max_adapter_bytes, help="largest adapter weights file accepted")
    a("--auth-token-file", default=d.auth_token_file,
      help="file of bearer tokens (one per line) required on every RPC except health and reflection")
    a("--admin-token-file", default=d.admin_token_file,
      help="file of bearer tokens required for LoadAdapter/UnloadAdapter")
    a("--tls-cert", default=d.tls_cert, help="PEM certificate chain: serve over TLS (with --tls-key)")
    a("--tls-key", default=d.tls_key, help="PEM private key for --tls-cert")
    a("--tls-client-ca", default=d.tls_client_ca, help="PEM CA bundle: require client certificates (mutual TLS)")
    a("--state-file", default=d.state_file,
      help="where adapters loaded at run time are recorded, to be loaded again on restart "
           "(default: <adapter-root>/.loraplex-state.json; replicas sharing a root need their own)")
    a("--adapter-cache-bytes", type=int, default=d.adapter_cache_bytes, help="host-memory budget for adapters")
    a("--no-autoload-adapters", dest="autoload_adapters", action="store_false",
      help="answer NOT_FOUND for adapters not loaded with LoadAdapter instead of loading them on first use")
    a("--target-modules", default=d.target_modules,
      help="modules adapters may target: 'all-linear' or comma-separated names, read as `loraplex train` reads "
           "them (spaces around a name ignored; each matches a module or its dotted suffix; one that matches no "
           "module of the model is warned about at start, since a list may be shared across model families)")
    a("--no-reflection", dest="reflection", action="store_false", help="do not serve gRPC server reflection")
    a("--grace-period", type=float, default=d.grace_period, help="seconds in-flight requests get on SIGTERM")
    a("--stream-stall-timeout", type=float, default=d.stream_stall_timeout,
      help="seconds a GenerateStream message may wait for its client to take it (HTTP/2 flow control) before the "
           "stream is ended and its slot freed")
    a("--threads", type=int, default=d.threads,
      help=f"torch CPU threads (0: torch's default, one per core; at most {THREADS_PER_CPU} per CPU)")
    a("--log-level", default=d.log_level, type=str.upper,
      choices=["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"],
      help="server log level (any case)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})


INT32 = 2 ** 31 - 1  # GetServerInfo reports these limits as 32-bit
UINT64 = 2 ** 64 - 1  # ... and these as 64-bit: a larger value made every GetServerInfo fail with INTERNAL
PORT = 65535  # grpc would bind a larger port (or a negative one) modulo 65536: 70000 listened on 4464
BOUNDS = {  # flag -> (lowest, highest or None); 0 lets the model decide where the lowest is 0
    "max_batch_size": (1, INT32), "max_active_adapters": (1, INT32), "max_lora_rank": (1, INT32),
    "max_hydra_heads": (1, INT32), "max_queue_size": (1, INT32), "max_queue_per_adapter": (0, INT32),
    "max_concurrent_rpcs": (1, INT32),
    "default_max_new_tokens": (1, INT32), "max_adapter_bytes": (1, UINT64), "max_prompt_tokens": (0, INT32),
    "max_new_tokens": (0, INT32), "max_kv_tokens": (0, UINT64), "max_prefill_tokens": (1, None),
    "prefix_cache_tokens": (0, UINT64),
    "adapter_cache_bytes": (1, UINT64), "port": (0, PORT), "metrics_port": (0, PORT),
}
PREFIX_BLOCK = 16  # tokens per block of the prefix cache (server/prefix_cache.py)
HIGHEST = {INT32: "< 2^31", UINT64: "< 2^64", PORT: "<= 65535"}
THREADS_PER_CPU = 4  # --threads above this many per CPU is refused: 100000 threads crashed the process


def threads_problem(threads: int) -> str | None:
    """Why --threads cannot work, or None: `loraplex serve` and `loraplex train` refuse it alike, at start."""
    if threads < 0:
        return f"--threads must be >= 0 (0: torch's default), got {threads}"
    cpus = os.cpu_count() or 1
    if threads > THREADS_PER_CPU * cpus:
        return (f"--threads {threads} is more than {THREADS_PER_CPU} per CPU of this machine ({cpus} CPUs, so at most "
                f"{THREADS_PER_CPU * cpus}): torch starts that many threads per parallel region, which only adds "
                f"switching (and thousands crash the process); 0 means one per core")
    return None


class ConfigError(ValueError):
    """A flag, or a file a flag names, that cannot work: reported in one line before anything is loaded."""


def check_config(c: ServerConfig) -> None:
    """Flag combinations that cannot work, reported before anything is loaded."""
    if bool(c.tls_cert) != bool(c.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if c.adapter_kernel == "native" and (not c.device.startswith("cpu") or c.dtype != "float32"):
        raise ConfigError(f"--adapter-kernel native runs on the CPU with --dtype float32, not {c.device} / {c.dtype}")
    if c.tls_client_ca and not c.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert/--tls-key (mutual TLS is TLS first)")
    problem = threads_problem(c.threads)
    if problem:
        raise ConfigError(problem)
    if not math.isfinite(c.grace_period) or c.grace_period < 0:
        raise ConfigError(f"--grace-period must be a number of seconds >= 0, got {c.grace_period}")
    if not math.isfinite(c.stream_stall_timeout) or c.stream_stall_timeout <= 0:
        raise ConfigError(f"--stream-stall-timeout must be a number of seconds > 0, got {c.stream_stall_timeout}")
    if c.state_file:
        state = Path(c.state_file)
        if state.exists() and not state.is_file():
            raise ConfigError(f"--state-file {state} exists and is not a regular file: give the path of a file "
                              f"(the server writes it, and replaces it on every adapter change)")
        if not state.parent.is_dir():
            raise ConfigError(f"--state-file {state}: the folder {state.parent} does not exist")
    if 0 < c.prefix_cache_tokens < PREFIX_BLOCK:
        raise ConfigError(f"--prefix-cache-tokens must be 0 (no prefix cache) or at least {PREFIX_BLOCK} (it keeps "
                          f"blocks of {PREFIX_BLOCK} tokens), got {c.prefix_cache_tokens}")
    if c.scheduling not in ("fair", "fifo"):
        raise ConfigError(f"--scheduling must be fair or fifo, got {c.scheduling!r}")
    if c.adapter_root and not Path(c.adapter_root).is_dir():
        raise ConfigError(f"--adapter-root {c.adapter_root} is not a directory: every adapter would be NOT_FOUND")
    for name, (low, high) in BOUNDS.items():
        value, flag = getattr(c, name), "--" + name.replace("_", "-")
        zero = " (0: a free port)" if high == PORT else " (0: none)" if name == "prefix_cache_tokens" else \
            " (0: no limit of its own)" if name == "max_queue_per_adapter" else \
            " (0: derived from the model)" if low == 0 else ""
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}{zero}, got {value}")
        if high is not None and value > high:
            raise ConfigError(f"{flag} must be {HIGHEST[high]}, got {value}")
    if c.model != "default" and not (Path(c.model) / "config.json").is_file():
        raise ConfigError(f"--model: {c.model} is not a Hugging Face model directory (no config.json)")
    # Last: these import torch (seconds), so a wrong number above is refused at once.
    serve_targets(c)
    from loader.base_model import device_problem  # here, not at import: the CLI's parser reads this module
    problem = device_problem(c.device)
    if problem:
        raise ConfigError(problem)


def serve_targets(c: ServerConfig) -> list[str] | str:
    """--target-modules as `loraplex train` reads it (adapters.targets.parse_targets): all-linear or module names,
    spaces around a name stripped; an empty name or a pattern is a ConfigError. Whether each name matches a module
    of the model is checked once the model is loaded (loader.inject.unmatched_problem)."""
    from adapters.targets import ALL_LINEAR, parse_targets  # here, not at import: the CLI's parser reads this module
    try:
        return parse_targets(c.target_modules, default=f"the default, {ALL_LINEAR}") or ALL_LINEAR
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def size_text(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def free_memory(device: str) -> int | None:
    """Bytes that can still be allocated on `device` (a --device value), or None where that is not known."""
    import torch  # here, not at import: the CLI's parser reads this module
    kind = torch.device(device)
    if kind.type == "cuda":  # the driver's free memory, and what torch's cache holds free (the model load left some)
        return torch.cuda.mem_get_info(kind)[0] + torch.cuda.memory_reserved(kind) - torch.cuda.memory_allocated(kind)
    if kind.type != "cpu":
        return None
    return _within_cgroup(_available())


def _available() -> int | None:
    try:  # MemAvailable counts the page cache the kernel gives back; the free pages alone undercount it
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _within_cgroup(free: int | None, root: Path = Path("/sys/fs/cgroup"),
                   own: Path = Path("/proc/self/cgroup")) -> int | None:
    """`free`, at most what the process's cgroup and its ancestors (v2, else v1's memory controller) still let it
    take: the machine's MemAvailable does not know a container's or a service's memory limit, past which the kernel
    kills the process. The process's cgroup is the one /proc/self/cgroup names, under the mount (the mount itself
    where a cgroup namespace shows it there). Inactive file pages, reclaimed first, count as room (as `docker stats`)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        lines = []
    paths = {}  # {"v2" or "v1": the process's cgroup under that hierarchy}
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not controllers:
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    for kind, top, limit_file, usage_file, inactive in (
            ("v2", root, "memory.max", "memory.current", "inactive_file"),
            ("v1", root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        at = top / paths.get(kind, "").lstrip("/")
        at = at if at.is_dir() else top
        rooms, seen = [], False
        while True:  # the process's cgroup, then each one above it up to the mount
            try:
                limit = (at / limit_file).read_text().strip()
                usage = int((at / usage_file).read_text())
                stat = dict(entry.split()[:2] for entry in (at / "memory.stat").read_text().splitlines())
                seen = True
                if limit != "max" and int(limit) < 1 << 60:  # (v1 writes no limit as 2^63 rounded to pages)
                    rooms.append(max(0, int(limit) - usage + int(stat.get(inactive, 0))))
            except (OSError, ValueError):
                pass
            if at == top:
                break
            at = at.parent
        if seen:
            return free if not rooms else min(rooms) if free is None else min(free, *rooms)
    return free


def check_slot_bank(c: ServerConfig, features: list[tuple[int, int]], factor_bytes: int,
                    free: int | None) -> tuple[str, int]:
    """What the device adapter slot bank these flags ask for takes, once the adapted modules' (d_in, d_out) are known:
    refused (ConfigError naming the flags) beyond `free` bytes, before anything is allocated (rank 2^31-1 asked for
    54 TB, and the allocation failed with a traceback). Counts the HydraLoRA routers (float32), which are allocated
    with the first routed adapter. Returns the sum as text, for the log, and in bytes."""
    slots = c.max_active_adapters + 1  # slot 0: no adapter
    factors = slots * c.max_lora_rank * sum(d_in + d_out for d_in, d_out in features) * factor_bytes
    routers = slots * c.max_hydra_heads * sum(d_in + 1 for d_in, _ in features) * 4
    text = (f"{size_text(factors + routers)} ({slots} slots (--max-active-adapters + 1) x --max-lora-rank "
            f"{c.max_lora_rank} over {len(features)} adapted modules: {size_text(factors)} of factors; "
            f"--max-hydra-heads {c.max_hydra_heads}: {size_text(routers)} of routers)")
    if free is not None and factors + routers > free:
        raise ConfigError(f"the adapter slot bank needs {text}, more than the {size_text(free)} free on {c.device}: "
                          f"lower --max-active-adapters, --max-lora-rank or --max-hydra-heads")
    return text, factors + routers


# --max-kv-tokens 0 takes at most this share of the memory free at start (after the model, the slot bank and the
# prefix cache): the cache is one rectangle of buffers, which a growth or a join without room copies into new ones
# (both held for that moment: twice the budget), and a step's activations, masks and logits need room beside it.
KV_SHARE = 0.45


def kv_room(free: int | None, bytes_per_token: int) -> int | None:
    """Token slots (rows x positions) whose keys and values fit in KV_SHARE of `free` bytes; None where the free
    memory is not known."""
    return None if free is None else int(free * KV_SHARE) // max(1, bytes_per_token)


@dataclass(frozen=True)
class Limits:
    """The limits in force, with the model-derived defaults (the 0s of the flags) resolved."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_kv_tokens: int
    max_context: int
    default_max_new_tokens: int  # what a request that sets none gets: --default-max-new-tokens within --max-new-tokens
    prefix_cache_tokens: int  # --prefix-cache-tokens in whole blocks: what the prefix cache holds (0: none)
    kv_by_memory: bool = False  # max_kv_tokens is what the free memory holds (--max-kv-tokens 0), not the rows' need


def resolve_limits(c: ServerConfig, max_context: int, room: int | None = None) -> Limits:
    """`room`: kv_room of the memory free now (None: not known), the bound of a --max-kv-tokens left at 0."""
    max_new_tokens = min(c.max_new_tokens or max_context, max_context)
    needed = c.max_batch_size * max_context
    by_memory = not c.max_kv_tokens and room is not None and room < needed
    return Limits(max_prompt_tokens=min(c.max_prompt_tokens or max_context, max_context),
                  max_new_tokens=max_new_tokens, kv_by_memory=by_memory,
                  max_kv_tokens=c.max_kv_tokens or (room if by_memory else needed), max_context=max_context,
                  default_max_new_tokens=min(c.default_max_new_tokens, max_new_tokens),
                  prefix_cache_tokens=c.prefix_cache_tokens // PREFIX_BLOCK * PREFIX_BLOCK)

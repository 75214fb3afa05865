"""Server configuration: one frozen dataclass, built from command-line flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


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
    max_batch_size: int = 32
    max_active_adapters: int = 32
    max_lora_rank: int = 64
    max_hydra_heads: int = 8
    max_queue_size: int = 256
    max_concurrent_rpcs: int = 1024
    default_max_new_tokens: int = 64
    adapter_cache_bytes: int = 2 << 30
    autoload_adapters: bool = True
    target_modules: str = "all-linear"
    reflection: bool = True
    grace_period: float = 30.0
    threads: int = 0
    log_level: str = "INFO"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="local Hugging Face causal-LM directory, or 'default' (built-in model)")
    a("--adapter-root", default=d.adapter_root, help="directory holding one sub-directory per adapter id")
    a("--host", default=d.host)
    a("--port", type=int, default=d.port, help="gRPC port (0 picks a free one)")
    a("--metrics-host", default=d.metrics_host)
    a("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port (0 picks a free one)")
    a("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    a("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    a("--max-batch-size", type=int, default=d.max_batch_size, help="rows per forward pass")
    a("--max-active-adapters", type=int, default=d.max_active_adapters, help="device adapter slots")
    a("--max-lora-rank", type=int, default=d.max_lora_rank,
      help="slot width: the largest adapter rank (HydraLoRA: heads x rank) accepted")
    a("--max-hydra-heads", type=int, default=d.max_hydra_heads, help="largest HydraLoRA head count accepted")
    a("--max-queue-size", type=int, default=d.max_queue_size, help="waiting requests before RESOURCE_EXHAUSTED")
    a("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs)
    a("--default-max-new-tokens", type=int, default=d.default_max_new_tokens)
    a("--adapter-cache-bytes", type=int, default=d.adapter_cache_bytes, help="host-memory budget for adapters")
    a("--no-autoload-adapters", dest="autoload_adapters", action="store_false",
      help="answer NOT_FOUND for adapters not loaded with LoadAdapter instead of loading them on first use")
    a("--target-modules", default=d.target_modules,
      help="modules adapters may target: 'all-linear' or a comma-separated list of names")
    a("--no-reflection", dest="reflection", action="store_false")
    a("--grace-period", type=float, default=d.grace_period, help="seconds in-flight requests get on SIGTERM")
    a("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    a("--log-level", default=d.log_level)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})

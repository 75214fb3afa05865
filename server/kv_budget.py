"""How many KV-cache token slots the server keeps to at start, where --max-kv-tokens is left at 0: what the memory
free beside everything else allocated holds (server/app.py calls it once the model, the slot bank and the prefix
cache are in memory)."""
from __future__ import annotations

import logging

from server.config import KV_SHARE, ConfigError, Limits, ServerConfig, kv_room, resolve_limits, size_text

log = logging.getLogger("loraplex.app")  # the start-up log's, as before this was its own module


def kv_limits(config: ServerConfig, per_token: int, limits: Limits, free: int | None, before: int | None, held: int,
              host_cache: int) -> Limits:
    """`limits` with --max-kv-tokens 0 bounded by the memory free once the model, the slot bank and the prefix cache
    are allocated: the default, every row of the batch at the full context, would run a large model out of memory
    long before (a 7B Llama in fp16: 32 rows x 4096 tokens of keys and values take 64 GiB). That is `free`, the
    memory free now (None: not known), and at most the memory free `before` the model loaded less what the model and
    the slot bank take (`held`) and the prefix cache: a model mapped from its checkpoint's file (the CPU, as stored)
    leaves the free memory as it was, and the slot bank's HydraLoRA routers are allocated with the first routed
    adapter. `host_cache`: the bytes the host adapter cache may fill later in the same memory (on the CPU,
    --adapter-cache-bytes; else 0). `per_token`: the bytes of a token slot's keys and values."""
    max_context = limits.max_context
    if free is not None and before is not None:
        free = max(0, min(free, before - held - limits.prefix_cache_tokens * per_token))
    if free is not None:
        free = max(0, free - host_cache)
    limits = resolve_limits(config, max_context, kv_room(free, per_token))
    kv = f"{limits.max_kv_tokens} token slots ({size_text(limits.max_kv_tokens * per_token)})"
    beside = "the model, the slot bank" + (f", the prefix cache and the host adapter cache ({size_text(host_cache)}, "
                                           f"--adapter-cache-bytes)" if host_cache else " and the prefix cache")
    share = f"{round(100 * KV_SHARE)}% of the {size_text(free)} free on {config.device} beside {beside}" \
        if free is not None else ""
    if not limits.kv_by_memory:
        log.info("KV cache: up to %s, %s", kv, "--max-kv-tokens" if config.max_kv_tokens else
                 f"--max-batch-size x the context (within {share})" if share else
                 f"--max-batch-size x the context (the free memory on {config.device} is not known)")
    else:
        needs = f"--max-batch-size {config.max_batch_size} x the context {max_context} would need " \
                f"{size_text(config.max_batch_size * max_context * per_token)}"
        if limits.max_kv_tokens < 1:
            raise ConfigError(f"no memory is left on {config.device} for the KV cache ({size_text(free)} free beside "
                              f"{beside}; {needs}): lower --max-active-adapters, --max-lora-rank, --max-hydra-heads"
                              f"{', --adapter-cache-bytes' if host_cache else ''} or --prefix-cache-tokens, or take a "
                              f"larger device")
        log.info("KV cache: up to %s, what %s holds (%s; --max-kv-tokens sets it)", kv, share, needs)
    if limits.max_kv_tokens < max_context:
        log.warning("KV cache: requests whose prompt + max_new_tokens pass %d tokens (the context is %d) are "
                    "refused, OUT_OF_RANGE: that many token slots is %s", limits.max_kv_tokens, max_context,
                    "all the free memory holds" if limits.kv_by_memory else "what --max-kv-tokens allows")
    return limits

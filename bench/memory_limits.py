"""What a burst of hostile or careless requests costs the server's memory, on the built-in model:
  prompts  N concurrent prompts of ~3.8 MiB text (under gRPC's 4 MiB message limit), each far beyond the context
  budget   N concurrent requests, each on its own adapter id (copies of the demo adapters), under a small
           --adapter-cache-bytes
  kv       N requests of long prompts and generations arriving one every 50 ms: rows join and leave a running batch,
           whose KV caches are merged and dropped again and again
The server runs in this process (BackgroundServer); the figure is the growth of this process's peak RSS (VmHWM)
over the whole burst, with the status codes the clients got and the burst's wall time.

    .venv/bin/python bench/memory_limits.py [--probe prompts|budget|kv] [--requests N] [--budget BYTES]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from clients.client import AsyncClient  # noqa: E402
from loader.default_model import default_adapter_root  # noqa: E402
from server.background import BackgroundServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402


def peak_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024


async def burst(target: str, calls: list[tuple[str, str]], max_new_tokens: int = 20,
                every: float = 0.0) -> collections.Counter:
    """Each call's status code name; call i sent `every` x i seconds after the first."""
    async with AsyncClient(target, timeout=300) as client:
        async def one(i: int, prompt: str, adapter_id: str) -> str:
            await asyncio.sleep(every * i)
            try:
                await client.generate(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens,
                                      ignore_eos=every > 0)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name
        return collections.Counter(await asyncio.gather(*[one(i, p, a) for i, (p, a) in enumerate(calls)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", choices=["prompts", "budget", "kv"], default="budget")
    p.add_argument("--requests", type=int, default=None, help="default: 6 (prompts), 240 (budget), 64 (kv)")
    p.add_argument("--budget", type=int, default=4 << 20, help="--adapter-cache-bytes for the budget probe")
    args = p.parse_args()
    settings = dict(model="default", port=0, metrics_port=0, threads=2, log_level="ERROR", max_queue_size=1000)
    shape = {}
    if args.probe == "prompts":
        n = args.requests or 6
        calls = [("ab" * (1900 << 10), "")] * n
    elif args.probe == "kv":
        n = args.requests or 64
        calls = [(f"{i} " + "tiger " * 10, "") for i in range(n)]
        shape = dict(max_new_tokens=180, every=0.05)
    else:
        n = args.requests or 240
        root = Path(tempfile.mkdtemp(prefix="loraplex-budget-"))
        demos = sorted(d for d in default_adapter_root().iterdir() if d.is_dir())
        calls = []
        for i in range(n):
            shutil.copytree(demos[i % len(demos)], root / f"{demos[i % len(demos)].name}-{i}")
            calls.append((f"{demos[i % len(demos)].name}: tiger =>", f"{demos[i % len(demos)].name}-{i}"))
        settings.update(adapter_root=str(root), adapter_cache_bytes=args.budget)
    server = BackgroundServer(ServerConfig(**settings)).start()
    try:
        before, start = peak_mib(), time.monotonic()
        codes = asyncio.run(burst(server.target, calls, **shape))
        seconds, after = time.monotonic() - start, peak_mib()
    finally:
        server.stop()
    print(f"probe {args.probe}: {n} requests in {seconds:.1f} s; status codes {dict(codes)}; "
          f"peak RSS {before} -> {after} MiB (+{after - before})")


if __name__ == "__main__":
    main()

"""How long Python's garbage collector holds the GIL while the server serves, with the objects alive at start-up
left in its generations (as an in-process server) and frozen out of them (as `loraplex serve` does once the model is
warm: server.app.freeze_heap).

One server in this process on the built-in model and its demo adapters; the same load twice, first as it starts, then
after freeze_heap(): --rounds rounds of --requests requests (one every 10 ms, 30-49 new tokens each, adapters in
turn). Every collection is timed through gc.callbacks, by generation; a full (generation 2) collection stops the
engine thread, so every stream's next token waits for it.

    .venv/bin/python bench/gc_pauses.py [--rounds 8] [--requests 240]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.client import AsyncClient  # noqa: E402
from loader.default_model import default_adapter_root  # noqa: E402
from server.app import freeze_heap  # noqa: E402
from server.background import BackgroundServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402


async def burst(target: str, adapters: list[str], n: int) -> None:
    async with AsyncClient(target, timeout=300) as client:
        async def one(i: int) -> None:
            await asyncio.sleep(0.01 * i)
            await client.generate(f"{adapters[i % len(adapters)]}: tiger {i} =>", adapters[i % len(adapters)],
                                  max_new_tokens=30 + i % 20, ignore_eos=True)
        await asyncio.gather(*[one(i) for i in range(n)])


def timed_load(target: str, adapters: list[str], rounds: int, n: int) -> tuple[dict[int, list[float]], float]:
    """Each generation's collection times (seconds) over the load, and the load's wall time."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])
    gc.callbacks.append(record)
    start = time.perf_counter()
    try:
        for _ in range(rounds):
            asyncio.run(burst(target, adapters, n))
    finally:
        gc.callbacks.remove(record)
    return pauses, time.perf_counter() - start


def full_collection_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--requests", type=int, default=240, help="per round (within --max-queue-size 1000)")
    args = p.parse_args()
    adapters = sorted(d.name for d in default_adapter_root().iterdir() if d.is_dir())
    server = BackgroundServer(ServerConfig(model="default", port=0, metrics_port=0, threads=2, log_level="ERROR",
                                           max_queue_size=1000)).start()  # not the main thread: nothing frozen
    try:
        rows = {}
        for label in ("as started", "frozen"):
            if label == "frozen":
                frozen = freeze_heap()
            one = full_collection_ms()
            pauses, wall = timed_load(server.target, adapters, args.rounds, args.requests)
            rows[label] = (one, pauses, wall)
    finally:
        server.stop()
        gc.unfreeze()
    print(f"{args.rounds} rounds x {args.requests} requests, built-in model; {frozen} objects frozen")
    print(f"{'heap':12s} {'one full collection':>20s} {'load':>7s} {'gen0 n/max ms':>14s} {'gen1 n/max ms':>14s} "
          f"{'gen2 n/max ms':>14s} {'gen2 total ms':>14s}")
    for label, (one, pauses, wall) in rows.items():
        cells = [f"{len(p)}/{1000 * max(p, default=0):.1f}" for p in pauses.values()]
        print(f"{label:12s} {one:17.1f} ms {wall:6.1f}s {cells[0]:>14s} {cells[1]:>14s} {cells[2]:>14s} "
              f"{1000 * sum(pauses[2]):14.0f}")
    worst = [max(rows[label][1][2], default=0) for label in rows]
    if worst[0] and worst[1]:
        print(f"longest full collection, frozen / as started: {worst[1] / worst[0]:.3f}")


if __name__ == "__main__":
    main()

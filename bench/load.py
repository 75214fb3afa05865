"""Load benchmark (issue 6): many concurrent streams over many adapters against the built-in model.

The server runs as a child process (`python -m server --model default`, its default limits unless flags are
passed through --server-flag) with an adapter root of N copies of the four shipped demo adapters. Every stream
asks its adapter a held-out question of that adapter's task, so answers are checked too. Each stream ends as
exactly one of: completed (final message with a finish reason), rejected (RESOURCE_EXHAUSTED: an explicit
refusal), failed (any other status), or lost (the stream ended without a finish reason or an error: must be 0).

    .venv/bin/python bench/load.py [--streams 1000] [--adapters 50]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.server_process import ServerProcess  # noqa: E402
from clients.client import AsyncClient  # noqa: E402
from loader.builtin_tasks import DEMO_TASKS, examples  # noqa: E402
from loader.default_model import default_adapter_root  # noqa: E402


@dataclass
class Outcome:
    adapter: str
    status: str = "lost"
    code: str = ""
    correct: bool = False
    tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None


@dataclass
class Report:
    outcomes: list[Outcome]
    wall: float
    peak_rss: int
    codes: dict[str, int] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def summary(self) -> dict:
        done = [o for o in self.outcomes if o.status == "completed"]
        ttft = sorted(o.ttft for o in done)
        e2e = sorted(o.e2e for o in done)
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
        failed = {}
        for o in self.outcomes:
            if o.status == "failed":
                failed[o.code] = failed.get(o.code, 0) + 1
        return {"streams": len(self.outcomes), "completed": len(done), "rejected": self.count("rejected"),
                "failed": failed, "lost": self.count("lost"),
                "correct": sum(o.correct for o in done), "wall_s": round(self.wall, 2),
                "tokens_per_s": round(sum(o.tokens for o in done) / self.wall, 1),
                "requests_per_s": round(len(done) / self.wall, 2),
                "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
                "e2e_p50_s": pct(e2e, 0.5), "e2e_p99_s": pct(e2e, 0.99),
                "peak_server_rss_mib": round(self.peak_rss / 2 ** 20, 1)}


def make_adapter_root(out: Path, n: int) -> dict[str, str]:
    """N copies of the demo adapters, round robin: {adapter id: task it answers}."""
    demos = sorted(DEMO_TASKS)
    plan = {}
    for i in range(n):
        demo = demos[i % len(demos)]
        adapter_id = f"{demo}-{i:03d}"
        shutil.copytree(default_adapter_root() / demo, out / adapter_id)
        tasks = sorted(DEMO_TASKS[demo][1])
        plan[adapter_id] = tasks[(i // len(demos)) % len(tasks)]
    return plan


async def one_stream(client: AsyncClient, adapter_id: str, question: dict, max_new: int) -> Outcome:
    outcome = Outcome(adapter_id)
    start = time.perf_counter()
    text = []
    try:
        async for message in client.generate_stream(question["prompt"], adapter_id, max_new_tokens=max_new):
            if message.token_ids and outcome.ttft is None:
                outcome.ttft = time.perf_counter() - start
            text.append(message.text)
            outcome.tokens += len(message.token_ids)
            if message.finish_reason:
                outcome.status = "completed"
                outcome.e2e = time.perf_counter() - start
                outcome.correct = "".join(text) == question["completion"]
    except grpc.RpcError as err:
        outcome.code = err.code().name
        outcome.status = "rejected" if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"
    return outcome


async def drive(target: str, plan: dict[str, str], streams: int, max_new: int, seed: int) -> list[Outcome]:
    ids = sorted(plan)
    questions = {task: examples([task], streams, seed, evaluation=True) for task in set(plan.values())}
    async with AsyncClient(target, timeout=600) as client:
        return await asyncio.gather(*[one_stream(client, ids[i % len(ids)], questions[plan[ids[i % len(ids)]]][i],
                                                 max_new) for i in range(streams)])


def run(streams: int, adapters: int, server_flags: list[str], max_new: int = 20, seed: int = 0) -> Report:
    with tempfile.TemporaryDirectory(prefix="loraplex-load-") as tmp:
        plan = make_adapter_root(Path(tmp), adapters)
        server = ServerProcess(["--model", "default", "--adapter-root", tmp, "--log-level", "WARNING",
                                "--state-file", str(Path(tmp) / ".state.json"), *server_flags])
        try:
            start = time.perf_counter()
            outcomes = asyncio.run(drive(server.target, plan, streams, max_new, seed))
            wall = time.perf_counter() - start
            peak = server.peak_rss_bytes()
        finally:
            server.stop()
    return Report(outcomes, wall, peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--server-flag", action="append", default=[], help="passed to `loraplex serve` (repeatable), "
                                                                       "e.g. --server-flag=--max-queue-size=2000")
    args = p.parse_args(argv)
    report = run(args.streams, args.adapters, args.server_flag, args.max_new_tokens)
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.count("lost") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

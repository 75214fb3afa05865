"""A burst of long prompts while streams decode: how long the running streams stall, and the newcomers' time to
first token, with prefills capped at --max-prefill-tokens against one prefill for the whole burst.

Each round: --running streams decode (short prompts, --running-tokens new tokens each); once they are under way
a burst of --burst requests with --burst-prompt-token prompts arrives at once. Reported per server variant: the
longest gap between two tokens of a running stream (medians over rounds) and the newcomers' TTFT. Every variant
is its own `python -m server` process; rounds alternate between them, so the figures are side by side.

    .venv/bin/python bench/prefill_burst.py [--repeats 5] [--caps 1000000,2048,1024]

Same model as bench/mixed_adapters.py (hidden 512, 8 layers, vocab 32000, context 512, fp32).
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from clients.client import AsyncClient  # noqa: E402
from mixed_adapters import add_common_arguments, build_model_dir, code_version, machine  # noqa: E402
from server_process import ServerProcess  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    a = p.add_argument
    a("--caps", default="1000000,2048", help="comma-separated --max-prefill-tokens values, one server each")
    a("--running", type=int, default=16, help="streams decoding when the burst arrives")
    a("--running-tokens", type=int, default=300)
    a("--burst", type=int, default=16, help="requests arriving at once")
    a("--burst-prompt-tokens", type=int, default=400)
    a("--settle", type=float, default=2.0, help="seconds the running streams decode before the burst")
    return p.parse_args(argv)


async def one_round(target: str, args, seed: int) -> tuple[float, list[float]]:
    g = torch.Generator().manual_seed(seed)
    burst = [torch.randint(3, args.vocab, (args.burst_prompt_tokens + i,), generator=g).tolist()
             for i in range(args.burst)]
    async with AsyncClient(target, timeout=600) as client:
        gaps: list[float] = []

        async def running(i: int) -> None:
            last, worst, n = None, 0.0, 0
            async for message in client.generate_stream([5 + i, 6, 7], max_new_tokens=args.running_tokens,
                                                        ignore_eos=True):
                now = time.perf_counter()
                if last is not None:
                    worst = max(worst, now - last)
                last, n = now, n + len(message.token_ids)
            assert n == args.running_tokens
            gaps.append(worst)

        async def newcomer(prompt: list[int], start: float) -> float:
            async for _ in client.generate_stream(prompt, max_new_tokens=8, ignore_eos=True):
                return time.perf_counter() - start
            raise AssertionError("a newcomer got no token")

        streams = [asyncio.create_task(running(i)) for i in range(args.running)]
        await asyncio.sleep(args.settle)
        start = time.perf_counter()
        ttft = await asyncio.gather(*(newcomer(p, start) for p in burst))
        await asyncio.gather(*streams)
    return max(gaps), ttft


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "cd " + shlex.quote(str(Path.cwd())) + " && " + " ".join(shlex.quote(a) for a in [sys.executable,
                                                                                                   *sys.argv])
    caps = [int(c) for c in args.caps.split(",")]
    results = {cap: {"gap": [], "ttft_p50": [], "ttft_max": []} for cap in caps}
    with tempfile.TemporaryDirectory(prefix="loraplex-burst-") as tmp:
        model_dir, root = Path(tmp) / "model", Path(tmp) / "adapters"
        build_model_dir(model_dir, args)
        root.mkdir()
        servers = {cap: ServerProcess(["--model", model_dir, "--adapter-root", root, "--device", args.device,
                                       "--threads", args.threads, "--log-level", "WARNING",
                                       "--max-batch-size", args.running + args.burst, "--max-prefill-tokens", cap,
                                       "--state-file", Path(tmp) / f"state-{cap}.json"]) for cap in caps}
        try:
            for rnd in range(args.repeats + 1):
                for cap, server in servers.items():
                    gap, ttft = asyncio.run(one_round(server.target, args, seed=rnd))
                    label = "warm-up" if rnd == 0 else f"round {rnd}"
                    print(f"  {label:8s} --max-prefill-tokens {cap:>8d}: longest gap {gap:5.2f} s, TTFT median "
                          f"{statistics.median(ttft):5.2f} s, max {max(ttft):5.2f} s", flush=True)
                    if rnd:
                        results[cap]["gap"].append(gap)
                        results[cap]["ttft_p50"].append(statistics.median(ttft))
                        results[cap]["ttft_max"].append(max(ttft))
        finally:
            for server in servers.values():
                server.stop()
    print(f"\nprefill_burst: {args.running} streams decoding {args.running_tokens} tokens; a burst of {args.burst} "
          f"prompts of {args.burst_prompt_tokens}-{args.burst_prompt_tokens + args.burst - 1} tokens arrives after "
          f"{args.settle:g} s; medians of {args.repeats} alternated rounds\ncommand: {command}\n"
          f"machine: {machine(args)}\ncode: {code_version()}\n\n"
          "| --max-prefill-tokens | running streams' longest gap (s) | burst TTFT median (s) | burst TTFT max (s) |\n"
          "|---:|---:|---:|---:|")
    for cap, r in results.items():
        print(f"| {cap} | {statistics.median(r['gap']):.2f} | {statistics.median(r['ttft_p50']):.2f} | "
              f"{statistics.median(r['ttft_max']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

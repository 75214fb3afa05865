"""Chat-shaped traffic with and without the prefix cache (--prefix-cache-tokens), side by side: two servers (their own
processes) on the benchmark model of bench/mixed_adapters.py (a random Llama, hidden 512, 8 layers, vocab 32000,
fp32, context 1024) take the same rounds in turn; medians.

A round sends --requests requests over --adapters LoRA adapters at once: each a system prompt of --system tokens (one
per adapter) and a user message of --user tokens never sent before ("first turn"); then, at once, each conversation's
next turn: its first turn's prompt, the reply, and a new user message ("second turn"). With the cache, a first turn
copies its adapter's system prompt and runs the user message; a second turn copies the first turn and its reply too.
Both servers' greedy tokens are checked equal.

    .venv/bin/python bench/prefix_cache.py [--requests 16] [--adapters 4] [--system 512] [--user 48]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.mixed_adapters import EngineBench, add_common_arguments, build_adapters, build_model_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--system", type=int, default=512, help="system prompt tokens (one per adapter)")
    p.add_argument("--user", type=int, default=48, help="tokens of each user message")
    p.add_argument("--cache-tokens", type=int, default=16384, help="the cached server's --prefix-cache-tokens")
    p.set_defaults(requests=16, max_new_tokens=16, repeats=3)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraplex-prefix-cache-"))
    model_dir, root = work / "model", work / "adapters"
    names = [f"chat{i}" for i in range(args.adapters)]
    if not (model_dir / "config.json").exists():
        build_model_dir(model_dir, args)
        build_adapters(model_dir, root, names, args)
    g = torch.Generator().manual_seed(args.seed)
    tokens = lambda n: torch.randint(3, args.vocab, (n,), generator=g).tolist()  # noqa: E731
    systems = {name: tokens(args.system) for name in names}
    adapters = [names[i % len(names)] for i in range(args.requests)]
    servers = {"no prefix cache": EngineBench(model_dir, root, names, args),
               "prefix cache": EngineBench(model_dir, root, names, args, prefix_cache_tokens=args.cache_tokens)}
    found = {(server, turn): [] for server in servers for turn in ("first turn", "second turn")}
    try:
        for repeat in range(args.repeats + 1):  # the first round warms both up, and is not counted
            firsts = [systems[a] + tokens(args.user) for a in adapters]
            replies = {}
            for name, bench in servers.items():
                wall, replies[name], stats = bench.round(firsts, adapters, args.max_new_tokens)
                if repeat:
                    found[(name, "first turn")].append((wall, stats))
            assert replies["prefix cache"] == replies["no prefix cache"], "the servers' tokens differ"
            seconds = [first + reply + tokens(args.user) for first, reply in zip(firsts, replies["prefix cache"])]
            for name, bench in servers.items():
                wall, replies[name], stats = bench.round(seconds, adapters, args.max_new_tokens)
                if repeat:
                    found[(name, "second turn")].append((wall, stats))
            assert replies["prefix cache"] == replies["no prefix cache"], "the servers' tokens differ"
    finally:
        for bench in servers.values():
            bench.close()
    print(f"{args.requests} requests over {args.adapters} adapters (r={args.rank}), system prompt {args.system} "
          f"tokens, user messages {args.user}, {args.max_new_tokens} new tokens (greedy), {args.threads} threads, "
          f"median of {args.repeats} rounds after a warm-up")
    print("turn | server | round s | prefill s | mean TTFT s | prompt tokens copied | round vs no cache")
    for turn in ("first turn", "second turn"):
        plain = [wall for wall, _ in found[("no prefix cache", turn)]]
        for name in servers:
            runs = found[(name, turn)]
            med = lambda key: statistics.median(s[key] for _, s in runs)  # noqa: E731
            ratio = statistics.median(wall / base for (wall, _), base in zip(runs, plain))
            print(f"{turn} | {name} | {statistics.median(w for w, _ in runs):.2f} | {med('prefill_s'):.2f} | "
                  f"{statistics.median(s['ttft_s'] / s['requests'] for _, s in runs):.3f} | {med('copied'):.0f} | "
                  f"{ratio:.2f}")


if __name__ == "__main__":
    main()

"""Fair scheduling between adapters: what a steady client's requests wait while another adapter floods the queue,
under --scheduling fifo and fair, side by side on the same server settings, and what fairness costs in throughput.

One adapter ("flood", a batch job) keeps --flood requests in flight, a new one as each ends; another ("steady", an
interactive client) sends --steady requests one after the other, each as the last one ended, starting once the
flood has filled the queue. Every steady request generates --max-new-tokens tokens, every flood one
--flood-max-new-tokens (ignore_eos), on a batch of --batch rows. Reported per scheduling (fifo; fair without
preemption; fair, the default), medians over --repeats rounds alternating them: the steady requests' time to first
token and end-to-end latency (median and 90th percentile of each round's), and the tokens both adapters got until the
steady client's last request ended, per second and the flood's share of them; then the steady client's requests alone
on an idle server (fair), for scale. With --duration, every round lasts that long whatever the scheduling: the steady
client sends requests until then, and tokens count until then (throughput over equal windows).

    .venv/bin/python bench/fairness.py
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mixed_adapters import (EngineBench, add_common_arguments, build_adapters, build_model_dir,  # noqa: E402
                                  code_version, machine, scrape)

NAMES = ["flood", "steady"]
PREEMPTED = 'loraplex_requests_preempted_total{adapter="flood"}'
VARIANTS = {"fifo": dict(scheduling="fifo"), "fair, no preemption": dict(scheduling="fair", preemption=False),
            "fair": dict(scheduling="fair")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    a = p.add_argument
    a("--batch", type=int, default=8, help="--max-batch-size of the server")
    a("--flood", type=int, default=48, help="requests the flooding adapter keeps in flight (--flood clients, each "
      "sending its next request as its last one ends)")
    a("--flood-head-start", type=float, default=1.0, help="seconds the flood runs before the steady client starts")
    a("--steady", type=int, default=5, help="requests the steady adapter sends one after the other")
    a("--flood-max-new-tokens", type=int, default=None, help="tokens each flood request generates (default: "
      "--max-new-tokens): long ones hold their rows until they end, unless preempted")
    a("--duration", type=float, default=0.0, help="seconds a round lasts, the same for every scheduling: the steady "
      "client sends requests until then (instead of --steady of them) and tokens count until then (0: a round lasts "
      "until --steady requests ended, so a scheduling that serves them sooner has shorter rounds)")
    a("--rank", type=int, default=8)
    p.set_defaults(max_new_tokens=32, repeats=3)
    args = p.parse_args(argv)
    args.flood_max_new_tokens = args.flood_max_new_tokens or args.max_new_tokens
    args.adapters = len(NAMES)
    args.requests = args.batch  # EngineBench's --max-batch-size
    return args


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_round(client, args, prompt: list[int]) -> dict:
    steady_ttft, steady_e2e, tokens = [], [], {"flood": 0, "steady": 0}

    async def timed(adapter: str) -> tuple[float, float]:
        sent = time.perf_counter()
        first = None
        tokens_wanted = args.flood_max_new_tokens if adapter == "flood" else args.max_new_tokens
        async for chunk in client.generate_stream(prompt, adapter, max_new_tokens=tokens_wanted, ignore_eos=True):
            if chunk.token_ids and first is None:
                first = time.perf_counter() - sent
            if deadline is None or time.perf_counter() <= deadline:
                tokens[adapter] += len(chunk.token_ids)
        return first, time.perf_counter() - sent

    async def flooding() -> None:  # one of --flood clients, each sending its next request as its last one ends
        while True:
            await timed("flood")

    start = time.perf_counter()
    deadline = start + args.duration if args.duration else None
    flood = [asyncio.create_task(flooding()) for _ in range(args.flood)]
    await asyncio.sleep(args.flood_head_start)  # the queue is full before the steady client starts
    while len(steady_e2e) < args.steady if deadline is None else time.perf_counter() < deadline:
        ttft, e2e = await timed("steady")
        steady_ttft.append(ttft)
        steady_e2e.append(e2e)
    wall = args.duration or time.perf_counter() - start
    served = dict(tokens)
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    return {"steady_ttft_p50": statistics.median(steady_ttft), "steady_ttft_p90": percentile(steady_ttft, 0.9),
            "steady_e2e_p50": statistics.median(steady_e2e), "steady_e2e_p90": percentile(steady_e2e, 0.9),
            "tokens_per_s": (served["flood"] + served["steady"]) / wall,
            "flood_share": served["flood"] / (served["flood"] + served["steady"])}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="loraplex-fair-"))
    model_dir, root = work / "model", work / "adapters"
    if not (model_dir / "config.json").exists():
        build_model_dir(model_dir, args)
    if not all((root / n / "adapter_model.safetensors").exists() for n in NAMES):
        build_adapters(model_dir, root, NAMES, args)
    prompt = list(range(3, 3 + args.prompt_min))
    benches = {name: EngineBench(model_dir, root, NAMES, args, max_queue_size=args.flood + args.steady, **settings)
               for name, settings in VARIANTS.items()}
    results: dict[str, list[dict]] = {s: [] for s in benches}
    try:
        for bench in benches.values():  # warm-up: one small round each
            bench.loop.run_until_complete(one_round(bench.client, argparse.Namespace(
                **{**vars(args), "flood": args.batch, "steady": 1, "flood_head_start": 0.1, "duration": 0.0}), prompt))
        before = scrape(benches["fair"].config.metrics_port)
        for _ in range(args.repeats):
            for name, bench in benches.items():
                results[name].append(bench.loop.run_until_complete(one_round(bench.client, args, prompt)))
        after = scrape(benches["fair"].config.metrics_port)
        cost = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (PREEMPTED, "loraplex_resumed_tokens_total",
                                                                      "loraplex_prompt_tokens_total",
                                                                      "loraplex_generation_tokens_total")}
        alone = benches["fair"].loop.run_until_complete(one_round(benches["fair"].client, argparse.Namespace(
            **{**vars(args), "flood": 0, "flood_head_start": 0.0, "duration": 0.0}), prompt))
    finally:
        for bench in benches.values():
            bench.close()
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    print(f"# fairness: {machine(args)}; code {code_version()}")
    steady = f"for {args.duration:g} s" if args.duration else f"{args.steady}"
    print(f"# batch {args.batch}, flood {args.flood} requests in flight ({args.flood_max_new_tokens} tokens each), "
          f"steady {steady} one after the other ({args.max_new_tokens} tokens each), prompt {args.prompt_min} "
          f"tokens; medians of {args.repeats} rounds")
    print("| | fifo | fair, no preemption | fair | fair / no preemption |\n|---|---:|---:|---:|---:|")
    for key, label in [("steady_ttft_p50", "steady: time to first token, median (s)"),
                       ("steady_ttft_p90", "steady: time to first token, p90 (s)"),
                       ("steady_e2e_p50", "steady: end to end, median (s)"),
                       ("steady_e2e_p90", "steady: end to end, p90 (s)"),
                       ("tokens_per_s", "tokens both got / wall time (tok/s)"),
                       ("flood_share", "the flood's share of those tokens")]:
        a, b, c = (med[name][key] for name in VARIANTS)
        print(f"| {label} | {a:.3f} | {b:.3f} | {c:.3f} | {c / b:.3f} |")
    print(f"# the steady client alone: time to first token {alone['steady_ttft_p50']:.3f} s, end to end "
          f"{alone['steady_e2e_p50']:.3f} s (medians)")
    print(f"# fair, over its {args.repeats} rounds: {cost[PREEMPTED]:.0f} requests preempted, "
          f"{cost['loraplex_resumed_tokens_total']:.0f} tokens prefilled again as they resumed, beside "
          f"{cost['loraplex_prompt_tokens_total']:.0f} prompt tokens prefilled and "
          f"{cost['loraplex_generation_tokens_total']:.0f} tokens generated")
    print("# rounds: " + "; ".join(f"{s}: " + ", ".join(f"{r['steady_e2e_p50']:.2f}" for r in rs)
                                   for s, rs in results.items()) + " (steady end to end, median, s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

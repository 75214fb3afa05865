"""Continuous batching under churn: requests of different lengths join and leave the running batch every few steps.

The benchmark model of bench/mixed_adapters.py (random Llama, 32 random LoRA adapters of rank 16) in the real server
(`python -m server`, a child process). Two workloads, interleaved `--repeats` times after an untimed warm-up:
  churn   `--requests` clients, each sending its next request as soon as its last one ends, `--total` requests in all:
          prompts of --prompt-min..--prompt-max tokens, --new-min..--new-max new tokens (ignore_eos), adapters in turn:
          the batch stays full while rows leave and join at different steps
  static  rounds of `--requests` requests sent at once, each of the churn's mean new tokens: every row joins at once
          and all finish together (no join or leave mid-round), as many tokens in all
Throughput is generated tokens / wall time. churn/static is what joining and leaving costs; 1.0 would be free.
With `--baseline DIR` (another checkout, its protos generated) the same is measured on its server, side by side,
and this checkout's ratios to it are printed; greedy tokens of the two servers' churn requests are compared.
`--time-steps` (with `--server inprocess`) also times the batch runner's calls in the churn runs: a decode step, a
prefill, a join of a prefill's rows to the running batch, the rows leaving it.

    .venv/bin/python bench/churn.py [--baseline DIR] [--repeats 3] [--total 192]
    .venv/bin/python bench/churn.py --server inprocess --time-steps
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.mixed_adapters import (EngineBench, add_common_arguments, agreement, build_adapters,  # noqa: E402
                                  build_model_dir, code_version, machine)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    a = p.add_argument
    a("--adapters", type=int, default=32)
    a("--rank", type=int, default=16)
    a("--total", type=int, default=192, help="requests of a churn run (a multiple of --requests)")
    a("--new-min", type=int, default=16)
    a("--new-max", type=int, default=128)
    a("--baseline", type=Path, default=None, help="another checkout whose server is measured beside this one's")
    a("--time-steps", action="store_true", help="with --server inprocess: time the batch runner's calls")
    p.set_defaults(prompt_max=64, repeats=3)
    args = p.parse_args(argv)
    if args.time_steps and (args.server != "inprocess" or args.baseline is not None):
        p.error("--time-steps times this process's server: it needs --server inprocess, and no --baseline")
    return args


class StepTimes:
    """Wall time of Runner's calls while `on` (the engine thread makes them; a churn run reads them)."""
    CALLS = {"decode_step": "decode step", "advance": "prefill", "join": "join", "keep": "leave"}

    def __init__(self) -> None:
        from server.batch import Runner
        from server.kv_cache import KVCache
        self.on, self.seconds, self.calls = False, dict.fromkeys(self.CALLS, 0.0), dict.fromkeys(self.CALLS, 0)
        for name in self.CALLS:
            setattr(Runner, name, self._timed(name, getattr(Runner, name)))
        self.copies, merge = 0, KVCache.merge  # joins that copied the whole cache into new buffers

        def counted(*args, **kwargs):
            self.copies += self.on
            return merge(*args, **kwargs)
        KVCache.merge = staticmethod(counted)

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1
        return timed

    def report(self, wall: float) -> list[str]:
        return [f"{label}: {self.calls[name]} calls, {1e3 * self.seconds[name] / max(1, self.calls[name]):.1f} "
                f"ms each, {100 * self.seconds[name] / wall:.1f}% of the churn runs' wall time"
                for name, label in self.CALLS.items()] + [f"joins into new buffers (the whole cache copied): {self.copies}"]


def workload(args, names: list[str]) -> list[tuple[list[int], str, int]]:
    """(prompt ids, adapter id, new tokens) of each churn request."""
    rng = random.Random(args.seed)
    return [([rng.randrange(3, args.vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))],
             names[i % len(names)], rng.randint(args.new_min, args.new_max)) for i in range(args.total)]


def churn(engine: EngineBench, jobs) -> tuple[float, int, list[list[int]]]:
    """`--requests` clients taking the jobs in order, each its next as soon as its last one ended."""
    outputs: list[list[int]] = [[] for _ in jobs]

    async def go():
        queue = list(enumerate(jobs))

        async def client():
            while queue:
                i, (prompt, adapter, new) = queue.pop(0)
                reply = await engine.client.generate(prompt, adapter, max_new_tokens=new, ignore_eos=True)
                outputs[i] = list(reply.token_ids)
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(engine.config.max_batch_size)))
        return time.perf_counter() - start
    wall = engine.loop.run_until_complete(go())
    return wall, sum(map(len, outputs)), outputs


def static(engine: EngineBench, jobs, new: int) -> tuple[float, int]:
    """The jobs' prompts and adapters in rounds of `--requests` sent at once, `new` tokens each."""
    wall = tokens = 0
    rows = engine.config.max_batch_size
    for start in range(0, len(jobs), rows):
        part = jobs[start:start + rows]
        seconds, outputs, _ = engine.round([p for p, _, _ in part], [a for _, a, _ in part], new)
        wall, tokens = wall + seconds, tokens + sum(map(len, outputs))
    return wall, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    args.code = code_version()
    torch.set_num_threads(args.threads)
    command = "cd " + shlex.quote(os.getcwd()) + " && " + " ".join(shlex.quote(a) for a in
                                                                  [os.path.relpath(sys.executable), *sys.argv])
    names = [f"lora{i:02d}" for i in range(args.adapters)]
    jobs = workload(args, names)
    new = round(statistics.mean(n for _, _, n in jobs))
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-", dir=args.workdir) as tmp:
        model_dir, adapter_root = Path(tmp) / "model", Path(tmp) / "adapters"
        build_model_dir(model_dir, args)
        build_adapters(model_dir, adapter_root, names, args)
        steps = StepTimes() if args.time_steps else None
        servers = {"this": EngineBench(model_dir, adapter_root, names, args)}
        if args.baseline is not None:
            servers["baseline"] = EngineBench(model_dir, adapter_root, names, args, cwd=args.baseline.resolve())
        runs = {(s, w): [] for s in servers for w in ("churn", "static")}
        outputs, churn_wall = {}, 0.0
        try:
            for repeat in range(args.repeats + 1):  # repeat 0: the untimed warm-up
                for name, engine in servers.items():
                    if steps is not None:
                        steps.on = repeat > 0
                    wall, tokens, outputs[name] = churn(engine, jobs)
                    if steps is not None:
                        steps.on = False
                    if repeat:
                        runs[name, "churn"].append(tokens / wall)
                        churn_wall += wall
                    wall, tokens = static(engine, jobs, new)
                    if repeat:
                        runs[name, "static"].append(tokens / wall)
                    print(f"repeat {repeat} {name}: churn {runs[name, 'churn'][-1] if repeat else 0:.1f} tok/s, "
                          f"static {runs[name, 'static'][-1] if repeat else 0:.1f} tok/s", flush=True)
        finally:
            for engine in servers.values():
                engine.close()
    median = {key: statistics.median(values) for key, values in runs.items()}
    lines = [
        f"churn: {args.total} requests from {args.requests} clients (each sends its next when its last ends), prompts "
        f"{args.prompt_min}-{args.prompt_max} tokens, {args.new_min}-{args.new_max} new tokens (mean {new}), "
        f"{args.adapters} LoRA adapters r={args.rank} in turn; static: rounds of {args.requests} requests of {new} new "
        f"tokens each; Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, {args.device}, "
        f"`--max-batch-size {args.requests}`; median of {args.repeats} interleaved runs",
        f"date: {datetime.date.today().isoformat()}",
        f"command: {command}",
        f"machine: {machine(args)}",
        f"code: {args.code}" + (f"; baseline: {args.baseline}" if args.baseline else ""),
        "",
        "| server | churn tok/s | static tok/s | churn/static | runs churn; static |",
        "|---|---:|---:|---:|---|",
    ]
    for name in servers:
        churned, fixed = median[name, "churn"], median[name, "static"]
        lines.append(f"| {name} | {churned:.1f} | {fixed:.1f} | {churned / fixed:.3f} | "
                     f"{', '.join(f'{r:.1f}' for r in runs[name, 'churn'])}; "
                     f"{', '.join(f'{r:.1f}' for r in runs[name, 'static'])} |")
    if steps is not None:
        lines += ["", "the batch runner's calls in the churn runs (the server in this process):", *steps.report(churn_wall)]
    if args.baseline is not None:
        lines.append("")
        lines.append(f"this/baseline: churn {median['this', 'churn'] / median['baseline', 'churn']:.3f}, "
                     f"static {median['this', 'static'] / median['baseline', 'static']:.3f}")
        lines.append(f"greedy tokens of the churn requests, this vs baseline: "
                     f"{agreement(outputs['this'], outputs['baseline'])}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

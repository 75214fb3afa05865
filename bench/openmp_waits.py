"""How the server's OpenMP wait setting trades idle speed against speed beside other busy processes.

torch's CPU build runs libgomp, whose threads spin at a barrier before sleeping (GOMP_SPINCOUNT, 300,000 by
default; OMP_WAIT_POLICY=PASSIVE: 0). Spinning saves a futex wake-up per parallel region on an idle machine; beside
a busy process a spinning thread holds the core its partner needs. Each setting runs in its own server process
(`python -m server`, the same flags); every round runs every setting on (a) 32 base-model requests and (b) 32
requests over 32 distinct LoRA r=32 adapters (all seven projections: 56 adapter-kernel regions per step), first on
the idle machine, then beside --busy shell loops (`while :; do :; done`), interleaved. Medians are reported, and
each setting relative to the first.

    .venv/bin/python bench/openmp_waits.py [--settings "OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=1000"] [--busy 1]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from mixed_adapters import (EngineBench, add_common_arguments, build_adapters, build_model_dir,  # noqa: E402
                            code_version, machine, make_prompts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--settings", default="OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=300;GOMP_SPINCOUNT=1000;"
                                         "GOMP_SPINCOUNT=300000",
                   help="';'-separated server environments, each KEY=VALUE[,KEY=VALUE]; the first is the reference")
    p.add_argument("--busy", type=int, default=1, help="busy shell loops beside the server in the busy rounds")
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args(argv)
    args.adapters = args.requests
    return args


class BusyLoops:
    """`count` shell processes spinning on the CPU while the block runs."""

    def __init__(self, count: int) -> None:
        self.count, self.procs = count, []

    def __enter__(self) -> "BusyLoops":
        self.procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(self.count)]
        time.sleep(0.5)  # let the scheduler see them before the round starts
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    args.code = code_version()
    torch.set_num_threads(args.threads)
    command = "cd " + shlex.quote(str(ROOT)) + " && " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    settings = args.settings.split(";")
    names = [f"lora{i:02d}" for i in range(args.requests)]
    configs = {"base": [""] * args.requests, "lora": names}
    prompts, new = make_prompts(args), args.max_new_tokens
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-waits-", dir=args.workdir) as tmp:
        model_dir, root = Path(tmp) / "model", Path(tmp) / "adapters"
        build_model_dir(model_dir, args)
        build_adapters(model_dir, root, names, args)
        engines = {s: EngineBench(model_dir, root, names, args, env=dict(kv.split("=", 1) for kv in s.split(",")))
                   for s in settings}
        try:
            for rnd in range(args.repeats + 1):
                for busy in (0, args.busy):
                    with BusyLoops(busy):
                        for s, engine in engines.items():
                            for key, ids in configs.items():
                                wall, tokens, _ = engine.round(prompts, ids, new)
                                assert sum(map(len, tokens)) == len(prompts) * new
                                rate = len(prompts) * new / wall
                                print(f"  {'warm-up' if rnd == 0 else f'round {rnd}':8s} busy={busy} {s:28s} {key:5s}"
                                      f" {rate:8.1f} tok/s", flush=True)
                                if rnd:
                                    results.setdefault((s, busy, key), []).append(rate)
        finally:
            for engine in engines.values():
                engine.close()
    median = {k: statistics.median(v) for k, v in results.items()}
    ref = settings[0]
    lines = [f"openmp_waits: {args.requests} rows x {new} new tokens, Llama hidden {args.hidden}, {args.layers} layers, "
             f"vocab {args.vocab}, fp32; (lora) 32 distinct LoRA r={args.rank} on all seven projections; server "
             f"--threads {args.threads}; busy: {args.busy} shell loop(s); median of {args.repeats} interleaved rounds",
             f"command: {command}", f"machine: {machine(args)}", f"code: {args.code}", "",
             "| server setting | idle base tok/s | idle lora tok/s | lora/base idle | busy base tok/s "
             "| busy lora tok/s | busy base vs first | busy lora vs first |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        m = {(busy, key): median[s, busy, key] for busy in (0, args.busy) for key in configs}
        lines.append(f"| {s} | {m[0, 'base']:.1f} | {m[0, 'lora']:.1f} | {m[0, 'lora'] / m[0, 'base']:.3f} | "
                     f"{m[args.busy, 'base']:.1f} | {m[args.busy, 'lora']:.1f} | "
                     f"{m[args.busy, 'base'] / median[ref, args.busy, 'base']:.2f} | "
                     f"{m[args.busy, 'lora'] / median[ref, args.busy, 'lora']:.2f} |")
    print("\n" + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

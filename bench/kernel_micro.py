"""The adapter delta alone, native CPU kernel vs the torch path, on the benchmark model's 56 module shapes
(8 layers x q/k/v/o 512x512, gate/up 512x1408, down 1408x512): one distinct LoRA per row, every module, for
prompts of T tokens per row (T=1 is a decode step). The torch time includes building its batch-ordered copies,
which it redoes whenever the batch changes; the kernel reads the slot bank directly.

    .venv/bin/python bench/kernel_micro.py [--rank 32] [--rows 32] [--dtype float32|bfloat16|float16]
                                           [--tokens 1,8,32,128]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.canonical import ModuleFactors  # noqa: E402
from adapters.slot_bank import ModuleShape, SlotBank  # noqa: E402
from adapters.torch_rows import TorchRows  # noqa: E402

DIMS = [(512, 512)] * 4 + [(512, 1408)] * 2 + [(1408, 512)]


class Random:
    def __init__(self, serial: int, shapes: list[ModuleShape], rank: int) -> None:
        self.key = ("random", serial)
        self.modules = {s.name: ModuleFactors(torch.randn(rank, s.d_in) * 0.02, torch.randn(s.d_out, rank) * 0.02)
                        for s in shapes}


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", default="1,8,32,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [ModuleShape(f"layer{l}.m{i}", d_in, d_out) for l in range(8) for i, (d_in, d_out) in enumerate(DIMS)]
    dtype = getattr(torch, args.dtype)
    bank = SlotBank(shapes, args.rows, args.rank, torch.device("cpu"), dtype, kernel="native",
                    compute_dtype=torch.float32)
    slots = [bank.acquire(Random(i, shapes, args.rank)) for i in range(args.rows)]
    factor_bytes = args.rows * args.rank * sum(s.d_in + s.d_out for s in shapes) * bank.a[0].element_size()
    print(f"{args.rows} rows, each its own LoRA r={args.rank}, {args.dtype} factors ({factor_bytes / 1e6:.0f} MB), "
          f"{args.threads} threads, best of {args.repeats}")
    print("| tokens per row | native ms | torch ms (incl. gather) | native GB/s of factors |")
    print("|---:|---:|---:|---:|")
    for tokens in map(int, args.tokens.split(",")):
        xs = [torch.randn(args.rows, tokens, s.d_in) for s in shapes]
        ys = [torch.zeros(args.rows, tokens, s.d_out) for s in shapes]
        native = bank.gather(slots)

        def run_native():
            for i in range(len(shapes)):
                native.add_delta(i, xs[i], ys[i])

        def run_torch():
            rows = TorchRows.gather(bank, slots)
            for i in range(len(shapes)):
                rows.add_delta(i, xs[i], ys[i])
        t_native, t_torch = best_of(run_native, args.repeats), best_of(run_torch, args.repeats)
        print(f"| {tokens} | {t_native * 1e3:.1f} | {t_torch * 1e3:.1f} | {factor_bytes / t_native / 1e9:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Correctness of an adapter kernel on a device before its timings are trusted: the delta of a decode step for a
batch mixing base rows, LoRA of several ranks and HydraLoRA of 2-4 heads (with and without router bias), against the
per-row reference computed in fp32 on the CPU, for fp32, bf16 and fp16 factors; and a row's delta alone vs in the
batch, bit for bit. Exits 1 on any mismatch.

    python3 bench/kernel_check.py --device cuda --kernel triton

(The tests check the same on the CPU, the triton kernel in Triton's interpreter: tests/test_triton_kernel.py.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.canonical import ModuleFactors  # noqa: E402
from adapters.layer import reference_delta  # noqa: E402
from adapters.slot_bank import ModuleShape, SlotBank  # noqa: E402

SHAPES = [(512, 512), (512, 1408), (1408, 512), (4096, 4096), (70, 33)]


class Adapter:
    def __init__(self, serial: int, d_in: int, d_out: int, r: int, heads: int | None = None, bias: bool = False):
        self.key = ("check", serial)
        router = None if heads is None else torch.randn(heads, d_in)
        self.modules = {"m": ModuleFactors(torch.randn(r, d_in) / d_in ** 0.5, torch.randn(d_out, r * (heads or 1)),
                                           router, torch.randn(heads) if bias else None)}


def check(device: torch.device, kernel: str, dtype: torch.dtype, d_in: int, d_out: int) -> list[str]:
    torch.manual_seed(d_in + d_out)
    bank = SlotBank([ModuleShape("m", d_in, d_out)], num_slots=6, max_rank=32, device=device, dtype=dtype,
                    max_heads=4, kernel=kernel, compute_dtype=torch.float32)
    kinds = [Adapter(1, d_in, d_out, 8, 4), Adapter(2, d_in, d_out, 2, 3, bias=True), Adapter(3, d_in, d_out, 32),
             Adapter(4, d_in, d_out, 5), Adapter(5, d_in, d_out, 16, 2)]
    per_row = [kinds[i % 6] if i % 6 < 5 else None for i in range(32)]
    slots = [0 if a is None else bank.acquire(a) for a in per_row]
    x = torch.randn(len(per_row), 1, d_in)
    rows = bank.gather(slots)
    got = rows.add_delta(0, x.to(device), torch.zeros(len(per_row), 1, d_out, device=device)).cpu()
    want = reference_delta(x, [None if a is None else ModuleFactors(
        a.modules["m"].a.to(dtype).float(), a.modules["m"].b.to(dtype).float(), a.modules["m"].router,
        a.modules["m"].router_bias) for a in per_row], d_out)
    problems = []
    error = ((got - want).abs().max() / want.abs().max()).item()
    if not error < 1e-4:
        problems.append(f"relative error {error:.2e}")
    if any(got[i].abs().max() != 0 for i, a in enumerate(per_row) if a is None):
        problems.append("a base row got a delta")
    for i in (0, 1, 2):
        alone = bank.gather([slots[i]]).add_delta(0, x[i:i + 1].to(device), torch.zeros(1, 1, d_out, device=device))
        if not torch.equal(alone.cpu()[0], got[i]):
            problems.append(f"row {i} alone differs from the batch")
    print(f"{kernel} {str(dtype).removeprefix('torch.'):>8} {d_in:>4}x{d_out:<4} relative error {error:.2e} "
          f"{'OK' if not problems else 'FAIL: ' + '; '.join(problems)}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--kernel", default="triton", choices=["torch", "native", "triton"])
    args = p.parse_args()
    failed = [problem for dtype in (torch.float32, torch.bfloat16, torch.float16) for d_in, d_out in SHAPES
              for problem in check(torch.device(args.device), args.kernel, dtype, d_in, d_out)]
    print("kernel_check:", "FAILED" if failed else "all OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

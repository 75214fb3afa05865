"""Registers and stack (spills) of the Triton adapter kernel per variant, compiled for a GPU architecture without a
GPU: triton compiles each variant to a cubin and `cuobjdump -res-usage` (shipped with triton) reads its usage.

    .venv/bin/python bench/triton_spills.py [--arch 90] [--ranks 8,16,32,64,128,256] [--warps 4,8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's own default, without its warning
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adapters import triton_kernel  # noqa: E402

SIGNATURE = {"x": "*fp32", "y": "*fp32", "slots": "*i32", "ranks": "*i32", "heads": "*i32", "a": "*fp32",
             "b": "*fp32", "router": "*fp32", "bias": "*fp32", "bias_stride": "i32", "d_in": "i32", "d_out": "i32"}


class _Bank:  # what triton_kernel._meta reads of a slot bank
    def __init__(self, max_rank: int, max_heads: int) -> None:
        self.max_rank, self.max_heads = max_rank, max_heads


def usage(max_rank: int, routed: bool, warps: int, arch: int) -> tuple[int, str]:
    meta = triton_kernel._meta(_Bank(max_rank, 8))
    meta.pop("num_warps")
    constants = dict(meta, ROUTED=routed)
    compiled = triton.compile(ASTSource(fn=triton_kernel._kernel(), constexprs=constants,
                                        signature=dict(SIGNATURE, **{k: "constexpr" for k in constants})),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        out = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    line = next(l.strip() for l in out.splitlines() if "REG:" in l)
    return meta["BLOCK_O"], " ".join(part for part in line.split() if part.split(":")[0] in ("REG", "STACK"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--ranks", default="8,16,32,64,128,256", help="--max-lora-rank values")
    p.add_argument("--warps", default=f"4,{triton_kernel.NUM_WARPS}", help="warps per program to compare")
    args = p.parse_args()
    print(f"sm_{args.arch}; the kernel launches with {triton_kernel.NUM_WARPS} warps")
    print("max rank | routed | block | " + " | ".join(f"{w} warps" for w in args.warps.split(",")))
    for rank in (int(r) for r in args.ranks.split(",")):
        for routed in (False, True):
            cells = [usage(rank, routed, int(w), args.arch) for w in args.warps.split(",")]
            print(f"{rank} | {routed} | {cells[0][0]} | " + " | ".join(c[1] for c in cells))


if __name__ == "__main__":
    main()

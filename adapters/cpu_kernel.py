"""The native CPU adapter kernel (cpu_kernel.c): built once per machine with the system C compiler, loaded
with ctypes, called once per adapted module and step.

Why: decode with one adapter per row is bound by reading every row's factors. The torch path pads every
row to the batch's widest rank and head count and copies all rows' factors into batch order whenever the
batch changes; the kernel reads each row's own factors straight from the slot bank (no padding, no copies),
gates HydraLoRA heads in the same pass, and reads bf16 or fp16 factors (half the bytes of fp32) in fewer ms
than fp32 at decode (torch's bf16 batched matmuls on CPU take longer than its fp32 ones). Prompts go through
it token by token: faster than the torch path up to a few dozen tokens per row, slower for long fp32 prompts
(bench/kernel_micro.py). The torch path (adapters/torch_rows.py) is the oracle it is tested against.

The library is compiled with fixed AVX-512 flags (not -march=native) into $LORAPLEX_KERNEL_DIR (default
~/.cache/loraplex), named by a hash of source and flags, so a prebuilt copy (the Docker image
ships one) is used where no compiler is installed.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma", "f16c")
FACTOR_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KernelUnavailable(Exception):
    """The native kernel cannot run here; the message says why."""


def kernel_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_KERNEL_DIR") or Path.home() / ".cache" / "loraplex")


def _cpu_problem() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"it needs an x86-64 CPU with AVX-512, this is {platform.machine()}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        return f"cannot read /proc/cpuinfo to check for AVX-512 ({exc})"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "gcc", "cc") if c and shutil.which(c)), None)


def _library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode())
    return f"loraplex-cpu-kernel-{digest.hexdigest()[:16]}.so"


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent servers never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed to build {SOURCE.name}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build() -> Path:
    """The library's path, compiled first unless already there (for any x86-64 CPU: the CPU is checked on load)."""
    target = kernel_dir() / _library_name()
    if not target.is_file():
        compiler = _compiler()
        if compiler is None:
            raise KernelUnavailable(f"no C compiler (gcc/cc/$CC) to build {SOURCE.name} and no prebuilt {target}")
        _build(target, compiler)
    return target


@functools.cache
def load() -> ctypes.CDLL:
    """The kernel library, built if needed; KernelUnavailable with the reason if it cannot run here."""
    problem = _cpu_problem()
    if problem:
        raise KernelUnavailable(problem)
    target = build()
    # torch is imported first, so the library's libgomp.so.1 resolves to torch's own OpenMP runtime: one
    # thread pool, not two competing for the same cores.
    lib = ctypes.CDLL(str(target))
    fn = lib.loraplex_add_delta
    p, i = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [i, i, p, p, i, i, p, p, p, p, p, i, i, p, p, ctypes.c_int64, i, i]
    fn.restype = ctypes.c_int
    return lib


def available() -> str | None:
    """None when the kernel runs here, else why not."""
    try:
        load()
    except (KernelUnavailable, OSError) as exc:
        return str(exc)
    return None


def add_delta(rows: int, tokens: int, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
              ranks: torch.Tensor, heads: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              router: torch.Tensor | None, bias: torch.Tensor, max_heads: int, threads: int) -> None:
    """y += delta(x) in place for one module. x [rows·tokens, d_in] and y [rows·tokens, d_out]: contiguous fp32
    on the CPU; slots int32 [rows]; ranks/heads int32 [S] (this module); a [S, R, d_in], b [S, R, d_out];
    router [S, K, d_in] or None; bias: this module's [S, ·, K] view (slot stride given by its stride(0))."""
    status = load().loraplex_add_delta(
        rows, tokens, x.data_ptr(), y.data_ptr(), x.shape[-1], y.shape[-1], slots.data_ptr(), ranks.data_ptr(),
        heads.data_ptr(), a.data_ptr(), b.data_ptr(), FACTOR_DTYPES[a.dtype], a.shape[1],
        None if router is None else router.data_ptr(), bias.data_ptr(), bias.stride(0), max_heads, threads)
    if status != 0:
        raise MemoryError("the native adapter kernel could not allocate its scratch memory")


class NativeRows:
    """A batch's rows for the kernel: their slots (int32) and which modules any of them adapts."""

    def __init__(self, bank, slots: list[int]) -> None:
        self.bank = bank
        self.slots = torch.tensor(slots, dtype=torch.int32)
        self.adapted = (bank.ranks.index_select(1, self.slots.long()).amax(1) > 0).tolist()
        self.threads = torch.get_num_threads()

    def add_delta(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.adapted[index]:
            return y
        bank, rows = self.bank, len(self.slots)
        # The kernel trusts these; a mismatch would pair rows with the wrong tokens or write out of bounds.
        shape = bank.shapes[index]
        if x.dim() != 3 or x.shape[0] != rows or x.shape[-1] != shape.d_in or x.dtype != torch.float32 \
                or y.shape != (*x.shape[:2], shape.d_out) or y.dtype != torch.float32:
            raise ValueError(f"native kernel: x {tuple(x.shape)} {x.dtype} / y {tuple(y.shape)} {y.dtype} do not fit "
                             f"{rows} rows of module {shape.name}")
        x = x.reshape(-1, x.shape[-1]).contiguous()
        y = y.contiguous()
        add_delta(rows, x.shape[0] // rows, x, y, self.slots, bank.ranks[index], bank.heads[index], bank.a[index],
                  bank.b[index], bank.g[index], bank.g_bias[:, index, :], bank.max_heads, self.threads)
        return y


def check_bank(device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """The kernel computes on the CPU with fp32 activations from fp32, bf16 or fp16 factors."""
    if device.type != "cpu" or compute_dtype != torch.float32 or dtype not in FACTOR_DTYPES:
        raise ValueError(f"the native kernel needs a CPU model in float32 with float32, bfloat16 or float16 "
                         f"factors, not {device.type} / {compute_dtype} / {dtype}")


if __name__ == "__main__":  # ahead-of-time build, e.g. in an image without a compiler at run time
    if platform.machine() in ("x86_64", "AMD64"):
        print(build())
    else:
        print(f"no native kernel for {platform.machine()}: the server will use its torch path")

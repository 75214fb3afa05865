"""The native CPU adapter kernel (cpu_kernel.c): built once per machine with the system C compiler, loaded
with ctypes, called once per adapted module and step.

Why: decode with one adapter per row is bound by reading every row's factors. The torch path pads every
row to the batch's widest rank and head count and copies all rows' factors into batch order whenever the
batch changes; the kernel reads each row's own factors straight from the slot bank (no padding, no copies),
gates HydraLoRA heads in the same pass, and reads bf16 or fp16 factors (half the bytes of fp32) in fewer ms
than fp32 at decode (torch's bf16 batched matmuls on CPU take longer than its fp32 ones). Prompts go through
it in blocks of 4 tokens of a row, each factor vector loaded once per block: faster than the torch path at
every prompt length measured, 1 to 128 tokens per row (bench/kernel_micro.py). The torch path
(adapters/torch_rows.py) is the oracle it is tested against.

One source is compiled for two instruction sets with fixed flags (not -march=native): AVX-512, and AVX2 with
FMA and F16C for x86 CPUs without AVX-512 (AMD before Zen 4, most Intel client chips); the best one the CPU has is
loaded. Each library goes into $LORAPLEX_KERNEL_DIR (default ~/.cache/loraplex), named by a hash of source and
flags, so a prebuilt copy (the Docker image ships both) is used where no compiler is installed.
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
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


@dataclass(frozen=True)
class Isa:
    name: str
    flags: tuple[str, ...]      # the compiler's
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo's, all needed to run it


# Best first: the first one the CPU has is loaded.
ISAS = (Isa("avx512", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"),
            ("avx512f", "avx512bw", "avx512vl", "fma", "f16c")),
        Isa("avx2", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")))
FACTOR_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KernelUnavailable(Exception):
    """The native kernel cannot run here; the message says why."""


def kernel_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_KERNEL_DIR") or Path.home() / ".cache" / "loraplex")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        raise KernelUnavailable(f"cannot read /proc/cpuinfo to check for AVX-512 or AVX2 ({exc})") from exc
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def isa() -> Isa:
    """The best instruction set of ISAS this CPU runs; KernelUnavailable with the reason if none."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"it needs an x86-64 CPU with AVX-512 or AVX2, this is {platform.machine()}")
    flags = _cpu_flags()
    for candidate in ISAS:
        if flags.issuperset(candidate.cpu_flags):
            return candidate
    fallback = ISAS[-1]
    raise KernelUnavailable(f"this CPU lacks {', '.join(f for f in fallback.cpu_flags if f not in flags)} "
                            f"(it needs {' + '.join(fallback.cpu_flags)} at least)")


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "gcc", "cc") if c and shutil.which(c)), None)


def _library_name(target: Isa) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + list(target.flags)).encode())
    return f"loraplex-cpu-kernel-{target.name}-{digest.hexdigest()[:16]}.so"


def _build(path: Path, target: Isa, compiler: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent servers never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *target.flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed to build {SOURCE.name} for {target.name}: "
                                    f"{done.stderr.strip()[-800:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(target: Isa) -> Path:
    """The library's path for `target`, compiled first unless already there (on any x86-64 CPU: compiling
    does not need the instruction set, running does)."""
    path = kernel_dir() / _library_name(target)
    if not path.is_file():
        compiler = _compiler()
        if compiler is None:
            raise KernelUnavailable(f"no C compiler (gcc/cc/$CC) to build {SOURCE.name} and no prebuilt {path}")
        _build(path, target, compiler)
    return path


@functools.cache
def load() -> ctypes.CDLL:
    """The kernel library, built if needed; KernelUnavailable with the reason if it cannot run here."""
    target = build(isa())
    # torch is imported first, so the library's libgomp.so.1 resolves to torch's own OpenMP runtime: one
    # thread pool, not two competing for the same cores.
    lib = ctypes.CDLL(str(target))
    fn = lib.loraplex_add_delta
    p, i = ctypes.c_void_p, ctypes.c_int
    # rows, tokens, x, y, then what NativeRows.calls holds per module
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


class NativeRows:
    """A batch's rows for the kernel: their slots (int32) and, per module any of them adapts, the kernel's
    arguments but the activations. Resolved once per batch change, because a decode step calls the kernel once
    per adapted module (56 calls for the benchmark model): building the arguments call by call cost ~2 ms of a
    ~50 ms step (bench/RESULTS.md). The pointers stay valid: the bank's tensors are allocated once, and a slot
    in use by a batch is never rewritten (a router tensor allocated later belongs to slots not in this batch)."""

    def __init__(self, bank, slots: list[int]) -> None:
        self.bank = bank
        self.rows = len(slots)
        self.slots = torch.tensor(slots, dtype=torch.int32)  # kept alive: the kernel reads it by address
        adapted = (bank.ranks.index_select(1, self.slots.long()).amax(1) > 0).tolist()
        threads, dtype = torch.get_num_threads(), FACTOR_DTYPES[bank.dtype]
        self.calls: list[tuple | None] = []
        for i, shape in enumerate(bank.shapes):
            router = bank.g[i]
            self.calls.append((
                shape.d_in, shape.d_out, self.slots.data_ptr(), bank.ranks[i].data_ptr(), bank.heads[i].data_ptr(),
                bank.a[i].data_ptr(), bank.b[i].data_ptr(), dtype, bank.max_rank,
                None if router is None else router.data_ptr(), bank.g_bias[:, i, :].data_ptr(),
                bank.g_bias.stride(0), bank.max_heads, threads) if adapted[i] else None)
        self.kernel = load().loraplex_add_delta

    def add_delta(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += delta(x) in place for module `index`; x [rows, T, d_in] and y [rows, T, d_out], fp32 on the CPU."""
        call = self.calls[index]
        if call is None:
            return y
        shape, (d_in, d_out) = x.shape, call[:2]
        # The kernel trusts these; a mismatch would pair rows with the wrong tokens or write out of bounds.
        if len(shape) != 3 or shape[0] != self.rows or shape[2] != d_in or x.dtype != torch.float32 \
                or y.shape != (shape[0], shape[1], d_out) or y.dtype != torch.float32:
            raise ValueError(f"native kernel: x {tuple(x.shape)} {x.dtype} / y {tuple(y.shape)} {y.dtype} do not fit "
                             f"{self.rows} rows of module {self.bank.shapes[index].name}")
        x, y = x.contiguous(), y.contiguous()
        if self.kernel(self.rows, shape[1], x.data_ptr(), y.data_ptr(), *call) != 0:
            raise MemoryError("the native adapter kernel could not allocate its scratch memory")
        return y


def check_bank(device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """The kernel computes on the CPU with fp32 activations from fp32, bf16 or fp16 factors."""
    if device.type != "cpu" or compute_dtype != torch.float32 or dtype not in FACTOR_DTYPES:
        raise ValueError(f"the native kernel needs a CPU model in float32 with float32, bfloat16 or float16 "
                         f"factors, not {device.type} / {compute_dtype} / {dtype}")


if __name__ == "__main__":  # ahead-of-time build of every variant, e.g. in an image without a compiler at run time
    if platform.machine() in ("x86_64", "AMD64"):
        for each in ISAS:
            print(build(each))
    else:
        print(f"no native kernel for {platform.machine()}: the server will use its torch path")

"""The Triton adapter kernel (GPUs): a decode step's adapter delta of one module in one launch, read straight
from the slot bank.

Why: on a GPU the benchmark model's decode step is bound by host work, not by the GPU (bench/RESULTS.md, "GPU,
2026-11-23" and the host-bound proxy): every torch op costs a launch and its Python. The torch path spends 2 ops
per adapted module for LoRA and 8 where some row has a router (HydraLoRA), which is why HydraLoRA cost 1.51x
LoRA's time and a mixed batch ran at 0.52 of the base model there. This kernel computes shrink, gate and expand
of every row in one launch whatever the kinds in the batch, reads only each row's own rank and heads (no
padding to the batch's widest adapter), and copies nothing when the batch changes.

One program computes one token's outputs [tile·BLOCK_O, (tile+1)·BLOCK_O): the row's shrink z = A_s x (and its
gate g = softmax(R_s x + bias_s) where the module has routers), then y += B_s^T (g ⊗ z) for its tile, head by head
(expand columns h·r + j carry z[j]·g[h]). Every tile recomputes the shrink: r·d_in multiply-adds from factors the
tiles share through the cache, against a second launch and a round trip through memory. Tiles hold R x block
elements, R the slot width rounded up: the feature blocks narrow as slots widen. Arithmetic is fp32 whatever the
factor and model dtypes; a token's result depends on nothing else in the batch. The bank compiles every variant it
needs when it is made (`warm_up`), so a compile error or wait comes at start-up, not in a request.

Prompts (more than one token per row) go through the torch path (adapters/torch_rows.py): per token, this
kernel re-reads A once per output tile, which at thousands of tokens costs more than the batched matmuls.

Tested on the CPU with Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) against the
torch oracle; measured on a GPU with `bash bench/gpu.sh`.
"""
from __future__ import annotations

import functools
import os

import torch

BLOCK_ELEMENTS = 8192  # a factor tile's size: R x the block of features (fewer features for wider slots)
# Threads a program's tile is spread over: with 4 warps a tile of 8192 fp32 elements spills registers from rank 64
# (the server's default --max-lora-rank) up: 96-600 bytes of stack per thread on sm_90; with 8 none does up to rank
# 256, and ranks 16-32 use fewer registers (cuobjdump -res-usage of the cubins triton compiles for sm_90, no GPU).
NUM_WARPS = 8


class KernelUnavailable(Exception):
    """The Triton kernel cannot run here; the message says why."""


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def problem(device: torch.device) -> str | None:
    """None when the kernel can run on `device`, else why not."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        return f"it runs on CUDA GPUs (or on the CPU under TRITON_INTERPRET=1, for tests), not on {device.type}"
    try:
        _kernel()
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_delta(x, y, slots, ranks, heads, a, b, router, bias, bias_stride, d_in, d_out,
                  MAX_RANK: tl.constexpr, MAX_HEADS: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                  ROUTED: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
        m = tl.program_id(0)                      # row (one token each: a decode step)
        s = tl.load(slots + m).to(tl.int64)       # 64-bit offsets: slot x rank x features can pass 2^31
        r = tl.load(ranks + s)
        if r > 0:
            j = tl.arange(0, R)                   # shrink columns (R: MAX_RANK rounded up to a power of two)
            z = tl.zeros([R], dtype=tl.float32)
            h = tl.arange(0, K)                   # heads (K: MAX_HEADS rounded up)
            logits = tl.zeros([K], dtype=tl.float32)
            for i0 in range(0, d_in, BLOCK_I):
                i = i0 + tl.arange(0, BLOCK_I)
                xv = tl.load(x + m * d_in + i, mask=i < d_in, other=0.0).to(tl.float32)
                av = tl.load(a + (s * MAX_RANK + j[:, None]) * d_in + i[None, :],
                             mask=(j[:, None] < r) & (i[None, :] < d_in), other=0.0).to(tl.float32)
                z += tl.sum(av * xv[None, :], axis=1)
                if ROUTED:
                    rv = tl.load(router + (s * MAX_HEADS + h[:, None]) * d_in + i[None, :],
                                 mask=(h[:, None] < MAX_HEADS) & (i[None, :] < d_in), other=0.0)
                    logits += tl.sum(rv * xv[None, :], axis=1)
            o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
            out = (o[None, :] < d_out)
            if ROUTED:
                # bias is -inf on a slot's padded heads, and (0, -inf, ...) for a router-less slot: g = (1, 0, ...)
                logits += tl.load(bias + s * bias_stride + h, mask=h < MAX_HEADS, other=float("-inf"))
                e = tl.exp(logits - tl.max(logits, axis=0))
                g = e / tl.sum(e, axis=0)
                delta = tl.zeros([BLOCK_O], dtype=tl.float32)
                for head in range(0, tl.load(heads + s)):  # expand columns head·r + j carry z[j]·g[head]
                    gate = tl.sum(tl.where(h == head, g, 0.0), axis=0)
                    bv = tl.load(b + (s * MAX_RANK + head * r + j[:, None]) * d_out + o[None, :],
                                 mask=(j[:, None] < r) & out, other=0.0).to(tl.float32)
                    delta += tl.sum(bv * (z * gate)[:, None], axis=0)
            else:
                bv = tl.load(b + (s * MAX_RANK + j[:, None]) * d_out + o[None, :],
                             mask=(j[:, None] < r) & out, other=0.0).to(tl.float32)
                delta = tl.sum(bv * z[:, None], axis=0)
            yv = tl.load(y + m * d_out + o, mask=o < d_out, other=0.0)
            tl.store(y + m * d_out + o, (yv.to(tl.float32) + delta).to(y.dtype.element_ty), mask=o < d_out)

    return add_delta


def _power_of_two(n: int) -> int:
    """The block size covering n: a power of two (tl.arange's rule), at least 2 (no single-element blocks)."""
    return max(2, 1 << max(0, n - 1).bit_length())


def _meta(bank) -> dict:
    """The kernel's compile-time sizes for a bank (rank and heads rounded up, feature blocks of R x block <= 8192) and
    its launch's warps."""
    rank = _power_of_two(bank.max_rank)
    block = min(128, max(16, BLOCK_ELEMENTS // rank))
    return dict(MAX_RANK=bank.max_rank, MAX_HEADS=bank.max_heads, R=rank, K=_power_of_two(bank.max_heads),
                BLOCK_I=block, BLOCK_O=block, num_warps=NUM_WARPS)


def _module_args(bank, i: int, router) -> tuple:
    """Module i's kernel arguments after the slots: its bank tensors (the bias table stands in for an absent router:
    the kernel compiled without routers never reads it) and sizes."""
    shape = bank.shapes[i]
    return (bank.device_ranks[i], bank.device_heads[i], bank.a[i], bank.b[i], bank.g_bias if router is None else router,
            bank.g_bias[:, i, :], bank.g_bias.stride(0), shape.d_in, shape.d_out)


def _on_device(device: torch.device) -> None:
    """Triton launches on the thread's current CUDA device, not on its tensors': a bank on cuda:1 needs it set (once
    per batch on the thread that runs it, not per launch)."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device.index)


def warm_up(bank) -> None:
    """Compile the kernel for every module shape of the bank, with and without routers, now (at start-up) rather
    than in the first decode steps that need each: a launch on slot 0, which adapts nothing."""
    _on_device(bank.device)
    meta = _meta(bank)
    slot = torch.zeros(1, dtype=torch.int32, device=bank.device)
    seen = set()
    for i, shape in enumerate(bank.shapes):
        if (shape.d_in, shape.d_out) in seen:
            continue
        seen.add((shape.d_in, shape.d_out))
        x = torch.zeros(1, shape.d_in, dtype=bank.compute_dtype, device=bank.device)
        y = torch.zeros(1, shape.d_out, dtype=bank.compute_dtype, device=bank.device)
        for routed in (False, True):
            _kernel()[(1, -(-shape.d_out // meta["BLOCK_O"]))](x, y, slot, *_module_args(bank, i, None),
                                                               ROUTED=routed, **meta)


class TritonRows:
    """A batch's rows for the kernel: their slots on the device and, per module any of them adapts, the kernel's
    arguments but the activations (resolved once per batch change). The pointers stay valid: the bank's tensors
    are allocated once and a slot in use is never rewritten (a router allocated later belongs to other slots)."""

    def __init__(self, bank, slots: list[int]) -> None:
        self.bank = bank
        self.rows = len(slots)
        self.slot_list = slots
        self.slots = torch.tensor(slots, dtype=torch.int32, device=bank.device)
        adapted = (bank.ranks.index_select(1, torch.tensor(slots)).amax(1) > 0).tolist()
        self.calls = [(self.slots, *_module_args(bank, i, bank.g[i]), bank.g[i] is not None) if adapted[i] else None
                      for i in range(len(bank.shapes))]
        self.meta = _meta(bank)
        self.kernel = _kernel()
        _on_device(bank.device)
        self._prompts = None  # the torch path's batch-ordered copies, made on the first prompt

    def add_delta(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += delta(x) in place for module `index`; x [rows, T, d_in] and y [rows, T, d_out]."""
        call = self.calls[index]
        if call is None:
            return y
        if x.shape[1] > 1:
            if self._prompts is None:
                from adapters.torch_rows import TorchRows
                self._prompts = TorchRows.gather(self.bank, self.slot_list)
            return self._prompts.add_delta(index, x, y)
        slots, ranks, heads, a, b, router, bias, bias_stride, d_in, d_out, routed = call
        if x.shape != (self.rows, 1, d_in) or y.shape != (self.rows, 1, d_out):
            raise ValueError(f"triton kernel: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit {self.rows} rows "
                             f"of module {self.bank.shapes[index].name}")
        x, y = x.contiguous(), y.contiguous()
        self.kernel[(self.rows, -(-d_out // self.meta["BLOCK_O"]))](x, y, slots, ranks, heads, a, b, router, bias,
                                                                    bias_stride, d_in, d_out, ROUTED=routed,
                                                                    **self.meta)
        return y

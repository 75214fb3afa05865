"""Device-resident adapter slots and the per-batch row factors the adapted layers read.

Per adapted module the bank keeps A as [S, R, d_in] and (scaled) B^T as [S, R, d_out], R =
--max-lora-rank, in the factor dtype (--adapter-dtype; default the model's): the expand width K·r
of every adapter must fit in R. Routers (HydraLoRA) live in fp32 as [S, K_max, d_in] with a bias row
[S, K_max] per module that is -inf on padded heads, so a router-less slot's gate is exactly (1, 0, …).
Slot 0 is all zeros and means "no adapter". Per module and slot, `ranks` and `heads` record the shrink
rank (0: not adapted) and head count.

`gather` turns the slots of a batch's rows into what the adapted layers read, once per batch change:
with the native CPU kernel (adapters/cpu_kernel.py) or the triton kernel (adapters/triton_kernel.py) just
the slot list, the kernel reading the bank directly; with the torch path, batch-ordered copies of the rows'
factors (adapters/torch_rows.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters.canonical import CanonicalAdapter

NO_ADAPTER = 0
KERNELS = ("torch", "native", "triton")


@dataclass(frozen=True)
class ModuleShape:
    name: str
    d_in: int
    d_out: int
    stored_transposed: bool = False  # the base weight is stored (d_in, d_out), as a GPT-2 Conv1D's


class RowFactors(Protocol):
    """The adapters of one batch's rows, as the adapted layers apply them."""

    rows: int  # the batch's rows, in order

    def add_delta(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + every row's delta of module `index` for activations x [B, T, d_in]; may update y in place."""


class AdapterContext:
    """Shared by every adapted layer of one model: the factors of the batch being run right now."""

    def __init__(self) -> None:
        self.rows: RowFactors | None = None


def delta_dtype(factor_dtype: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """What the torch path computes an adapter's delta in: float32 factors in float32 (as PEFT keeps adapters in
    float32 on a half-precision model: x A B in float32, added to the base output and rounded once); half-precision
    factors in the model's dtype."""
    return torch.float32 if factor_dtype == torch.float32 else model_dtype


def narrowest(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the smallest range among `dtypes` (fp16's 65504 before bf16's and fp32's 3.4e38)."""
    return min(dtypes, key=lambda d: torch.finfo(d).max)


class SlotsFull(Exception):
    """Every slot is held by running rows; the request waits for one to free."""


class SlotBank:
    def __init__(self, shapes: list[ModuleShape], num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, max_heads: int = 8, kernel: str = "torch",
                 compute_dtype: torch.dtype | None = None) -> None:
        """dtype: how factors are stored; compute_dtype: the activations' (the model's) dtype, default dtype."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        self.shapes = shapes
        self.index = {s.name: i for i, s in enumerate(shapes)}
        self.num_slots = num_slots  # usable slots, slot 0 excluded
        self.max_rank = max_rank
        self.max_heads = max_heads
        self.device, self.dtype, self.kernel = device, dtype, kernel
        self.compute_dtype = compute_dtype or dtype
        self.delta_dtype = delta_dtype(dtype, self.compute_dtype)
        if kernel == "native":
            from adapters.cpu_kernel import check_bank
            check_bank(device, dtype, self.compute_dtype)
        if kernel == "triton":
            from adapters.triton_kernel import problem
            why = problem(device)
            if why:
                raise ValueError(f"the triton kernel cannot run: {why}")
        n = num_slots + 1
        self.a = [torch.zeros(n, max_rank, s.d_in, device=device, dtype=dtype) for s in shapes]
        self.b = [torch.zeros(n, max_rank, s.d_out, device=device, dtype=dtype) for s in shapes]
        self.g: list[torch.Tensor | None] = [None] * len(shapes)  # allocated on the first routed adapter
        self.g_bias = torch.full((n, len(shapes), max_heads), float("-inf"), device=device)
        self.g_bias[:, :, 0] = 0.0
        # Per module and slot, on the host (module-major: one module's row is contiguous for the kernel).
        self.ranks = torch.zeros(len(shapes), n, dtype=torch.int32)
        self.heads = torch.ones(len(shapes), n, dtype=torch.int32)
        # The triton kernel reads them on the device: copies, refreshed whenever a slot is written. Each module's
        # row starts 16 bytes aligned (a row stride of 4k int32s): triton compiles a variant per pointer alignment,
        # and its warm-up, which launches one module per shape, would miss the others' (a compile mid-request).
        stride = -(-n // 4) * 4
        self.device_ranks, self.device_heads = (torch.zeros(len(shapes), stride, dtype=torch.int32, device=device)
                                                [:, :n].copy_(t) for t in (self.ranks, self.heads))
        self._slot_of: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {}
        self._refs = [0] * n
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, n))  # LRU order
        if kernel == "triton":
            from adapters.triton_kernel import warm_up
            warm_up(self)  # compiled now, not in the first decode steps of the first adapter requests

    # -- residency (engine thread only) -------------------------------------------------------
    def acquire(self, adapter: CanonicalAdapter | None) -> int:
        """Slot holding `adapter` for one more row; writes it into the least recently used idle slot if needed."""
        if adapter is None:
            return NO_ADAPTER
        slot = self._slot_of.get(adapter.key)
        if slot is None:
            if not self._idle:
                raise SlotsFull()
            slot, _ = self._idle.popitem(last=False)
            old = self._key_of.pop(slot, None)
            if old is not None:
                del self._slot_of[old]
            try:
                self._write(slot, adapter)
            except BaseException:
                self._idle[slot] = None  # a failed write leaves an empty idle slot, not a lost one
                self._idle.move_to_end(slot, last=False)
                raise
            self._slot_of[adapter.key] = slot
            self._key_of[slot] = adapter.key
        elif self._refs[slot] == 0:
            self._idle.pop(slot)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot == NO_ADAPTER:
            return
        if self._refs[slot] == 0:  # a bookkeeping bug: going on would let another adapter overwrite a slot in use
            raise RuntimeError(f"slot {slot} released more often than acquired")
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None

    def forget(self, key: tuple) -> None:
        """Drop an unloaded or replaced version so its slot is reused first."""
        slot = self._slot_of.get(key)
        if slot is not None and self._refs[slot] == 0:
            del self._slot_of[key], self._key_of[slot]
            self._idle.move_to_end(slot, last=False)

    def available(self, adapter: CanonicalAdapter | None) -> bool:
        """Whether `acquire` would give `adapter` a slot now (resident, or an idle slot to write it into)."""
        return adapter is None or adapter.key in self._slot_of or bool(self._idle)

    def resident(self, key: tuple) -> bool:
        return key in self._slot_of

    def held(self, key: tuple) -> bool:
        """Resident and in use by some row: its slot cannot be given to another adapter meanwhile."""
        slot = self._slot_of.get(key)
        return slot is not None and self._refs[slot] > 0

    def active_requests(self, adapter_id: str) -> int:
        """Rows running on any version of `adapter_id`: a replaced version's rows run on to their end. (Read from
        other threads: list() copies the dict in one step under the GIL.)"""
        return sum(self._refs[slot] for key, slot in list(self._slot_of.items()) if key[0] == adapter_id)

    @property
    def used(self) -> int:
        return self.num_slots - len(self._idle)

    def _write(self, slot: int, adapter: CanonicalAdapter) -> None:
        self.ranks[:, slot] = 0
        self.heads[:, slot] = 1
        self.g_bias[slot].fill_(float("-inf"))
        self.g_bias[slot, :, 0] = 0.0
        for i in range(len(self.shapes)):
            self.a[i][slot].zero_()
            self.b[i][slot].zero_()
            if self.g[i] is not None:
                self.g[i][slot].zero_()
        for name, f in adapter.modules.items():
            i, r, w = self.index[name], f.rank, f.width
            self.a[i][slot, :r, :].copy_(f.a)
            self.b[i][slot, :w, :].copy_(f.b.t())
            self.ranks[i, slot] = r
            if f.router is not None:
                if self.g[i] is None:
                    self.g[i] = torch.zeros(self.num_slots + 1, self.max_heads, self.shapes[i].d_in,
                                            device=self.device)
                k = f.heads
                self.g[i][slot, :k, :].copy_(f.router)
                self.g_bias[slot, i, :k] = 0.0 if f.router_bias is None else f.router_bias
                self.heads[i, slot] = k
        self.device_ranks[:, slot].copy_(self.ranks[:, slot])
        self.device_heads[:, slot].copy_(self.heads[:, slot])

    # -- per batch ------------------------------------------------------------------------------
    def gather(self, slots: list[int]) -> RowFactors | None:
        """What the adapted layers read for rows using `slots` (None: no row has an adapter)."""
        if not any(slots):
            return None
        if self.kernel == "native":
            from adapters.cpu_kernel import NativeRows
            return NativeRows(self, slots)
        if self.kernel == "triton":
            from adapters.triton_kernel import TritonRows
            return TritonRows(self, slots)
        from adapters.torch_rows import TorchRows
        return TorchRows.gather(self, slots)

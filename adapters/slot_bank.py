"""Device-resident adapter slots and the per-batch row factors the adapted layers read.

The bank keeps, per adapted module, A^T as [S, d_in, r_max] and (scaled) B^T as [S, r_max, d_out].
Slot 0 is all zeros and means "no adapter". A batch does not gather from the bank at every step:
`gather` copies each row's factors once into batch-ordered tensors (`RowFactors`), rebuilt only
when the batch composition changes. Measured on 2 CPU cores, a per-step gather costs ~60% of the
base matmul while batch-ordered factors cost ~14% (bench/RESULTS.md).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters.canonical import CanonicalAdapter

NO_ADAPTER = 0


@dataclass(frozen=True)
class ModuleShape:
    name: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class RowFactors:
    """Per adapted module (by index): A^T rows [B, d_in, r] and B^T rows [B, r, d_out], or None when no row adapts it."""

    a: list[torch.Tensor | None]
    b: list[torch.Tensor | None]


class AdapterContext:
    """Shared by every adapted layer of one model: the factors of the batch being run right now."""

    def __init__(self) -> None:
        self.rows: RowFactors | None = None


class SlotsFull(Exception):
    """Every slot is held by running rows; the request waits for one to free."""


class SlotBank:
    def __init__(self, shapes: list[ModuleShape], num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.shapes = shapes
        self.index = {s.name: i for i, s in enumerate(shapes)}
        self.num_slots = num_slots  # usable slots, slot 0 excluded
        self.max_rank = max_rank
        self.device, self.dtype = device, dtype
        n = num_slots + 1
        self.a = [torch.zeros(n, s.d_in, max_rank, device=device, dtype=dtype) for s in shapes]
        self.b = [torch.zeros(n, max_rank, s.d_out, device=device, dtype=dtype) for s in shapes]
        # Per slot and module, the rank stored there (0 = module not adapted): sizes the row gather.
        self.ranks = torch.zeros(n, len(shapes), dtype=torch.long)
        self._slot_of: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {}
        self._refs = [0] * n
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, n))  # LRU order

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
            self._write(slot, adapter)
            self._slot_of[adapter.key] = slot
            self._key_of[slot] = adapter.key
        elif self._refs[slot] == 0:
            self._idle.pop(slot)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot == NO_ADAPTER:
            return
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None

    def forget(self, key: tuple) -> None:
        """Drop an unloaded or replaced version so its slot is reused first."""
        slot = self._slot_of.get(key)
        if slot is not None and self._refs[slot] == 0:
            del self._slot_of[key], self._key_of[slot]
            self._idle.move_to_end(slot, last=False)

    def resident(self, key: tuple) -> bool:
        return key in self._slot_of

    def active_requests(self, key: tuple) -> int:
        slot = self._slot_of.get(key)
        return 0 if slot is None else self._refs[slot]

    @property
    def used(self) -> int:
        return self.num_slots - len(self._idle)

    def can_hold(self, adapter: CanonicalAdapter | None) -> bool:
        return adapter is None or adapter.key in self._slot_of or bool(self._idle)

    def _write(self, slot: int, adapter: CanonicalAdapter) -> None:
        self.ranks[slot].zero_()
        for i in range(len(self.shapes)):
            self.a[i][slot].zero_()
            self.b[i][slot].zero_()
        for name, f in adapter.modules.items():
            i, r = self.index[name], f.rank
            self.a[i][slot, :, :r].copy_(f.a.t())
            self.b[i][slot, :r, :].copy_(f.b.t())
            self.ranks[slot, i] = r

    # -- per batch ------------------------------------------------------------------------------
    def gather(self, slots: list[int]) -> RowFactors | None:
        """Batch-ordered factors for rows using `slots`, cut to the widest rank present per module."""
        if not any(slots):
            return None
        idx = torch.tensor(slots, dtype=torch.long)
        widths = self.ranks.index_select(0, idx).amax(dim=0).tolist()
        dev_idx = idx.to(self.device)
        a: list[torch.Tensor | None] = []
        b: list[torch.Tensor | None] = []
        for i, r in enumerate(widths):
            if r == 0:
                a.append(None)
                b.append(None)
            else:
                a.append(self.a[i][:, :, :r].index_select(0, dev_idx))
                b.append(self.b[i][:, :r, :].index_select(0, dev_idx))
        return RowFactors(a, b)

"""KV cache for a left-padded batch: per-layer buffers [rows, H, capacity, D] that grow geometrically.

transformers' DynamicLayer concatenates the whole cache at every step; here a step writes one
column in place and attention reads a view. All rows share the time axis (right-aligned, pads on
the left), which is what lets rows join and leave between steps. The batch is a window of the buffers: its rows
are the first `rows` rows, its columns `length` columns from each layer's `first`. Rows leave (`compact`) by moving
the last rows into their places and join (`place`) into rows others left, copying only those rows: a batch that
rows join and leave every few steps (continuous batching) does not copy its whole cache each time.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

# each layer's keys and values of one row, [heads, positions, head dim]; None for a layer that keeps none
RowKV = list[tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class Prefix:
    """Keys and values already computed for a prompt's first `length` tokens (a running row's cache, or the prefix
    cache's blocks): `kv(n)` gives those of the first n, n <= length."""
    length: int
    kv: Callable[[int], RowKV]


def grown(capacity: int, needed: int, max_length: int) -> int:
    """The next capacity of buffers holding `capacity` columns that must hold `needed`: double, up to the cap."""
    return max(needed, min(max(2 * capacity, 16), max_length))


class _Layer(DynamicLayer):
    """`k`, `v`: the buffers (None until the first forward; stays None in a layer that keeps no keys and values);
    the batch's columns start at `first`."""

    def __init__(self, cache: "KVCache") -> None:
        super().__init__()
        # weak: a cache the batch drops (a merge, a select) is freed at once, buffers and all; a cycle would keep
        # them until Python's cyclic collector ran, which for a long-lived batch's cache can be minutes
        self._cache = weakref.proxy(cache)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.first = 0

    def update(self, key_states, value_states, *args, **kwargs):
        rows = key_states.shape[0]
        if self.k is None or self.k.shape[2] < self.first + self._cache.length + key_states.shape[-2]:
            self._grow(key_states, value_states, self._cache.length + key_states.shape[-2])
        t0 = self.first + self._cache.length
        t1 = t0 + key_states.shape[-2]
        self.k[:rows, :, t0:t1] = key_states
        self.v[:rows, :, t0:t1] = value_states
        self.is_initialized = True
        return self.k[:rows, :, self.first:t1], self.v[:rows, :, self.first:t1]

    def _grow(self, key_states, value_states, needed: int) -> None:
        # The first allocation (a prefill, whose cache's max_length is its prompts' length) is exactly the prompts,
        # also when they run in chunks: the engine caps the batch at its planned peak only once they ran, and that
        # can be shorter than a rounded-up buffer. Later growth doubles, up to the cap, and keeps the batch's rows
        # only (rows others left are given back).
        if self.k is None:
            capacity = max(needed, self._cache.max_length)
        else:
            capacity = grown(self.k.shape[2] - self.first, needed, self._cache.max_length)
        self.repack(key_states.shape[0], capacity, key_states, value_states)

    def window(self, rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = self.first
        return self.k[:rows, :, t0:t0 + self._cache.length], self.v[:rows, :, t0:t0 + self._cache.length]

    def repack(self, rows: int, capacity: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """New buffers of `rows` rows and `capacity` columns holding the batch's window at column 0."""
        k = like_k.new_zeros(rows, like_k.shape[1], capacity, like_k.shape[-1])
        v = like_v.new_zeros(rows, like_v.shape[1], capacity, like_v.shape[-1])
        if self.k is not None:
            old_k, old_v = self.window(rows)
            k[:, :, :old_k.shape[2]], v[:, :, :old_v.shape[2]] = old_k, old_v
        self.k, self.v, self.first = k, v, 0

    def get_seq_length(self) -> int:
        return self._cache.length


class KVCache(Cache):
    """`length` is the shared number of filled columns; the batch advances it after each forward. `rows`: the
    batch's rows (None: every row of the buffers).
    `max_length` caps how far the buffers grow: the engine lowers it to the running batch's planned peak, so
    buffers are allocated within what admission reserved for the rows then (--max-kv-tokens), apart from the moment
    a merge, a shrink or growth copies them (old and new buffers alive together); rows that leave keep their places
    for rows that join later (`compact`)."""

    def __init__(self, num_layers: int, max_length: int) -> None:
        super().__init__(layers=[_Layer(self) for _ in range(num_layers)])
        self.length = 0
        self.max_length = max_length
        self.rows: int | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def _filled(self) -> list[_Layer]:
        return [layer for layer in self.layers if layer.k is not None]

    def size(self) -> int:
        """The batch's rows."""
        return self.rows if self.rows is not None else self._filled()[0].k.shape[0]

    def allocated(self) -> tuple[int, int]:
        """(token slots, bytes) held by the buffers: rows x capacity, and every layer's K and V."""
        filled = self._filled()
        if not filled:
            return 0, 0
        slots = filled[0].k.shape[0] * filled[0].k.shape[2]
        # keys and values may differ in width (multi-head latent attention: DeepSeek-V2/V3, MiniCPM3)
        return slots, sum(t.numel() * t.element_size() for layer in filled for t in (layer.k, layer.v))

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's filled keys and values of the batch's rows (views); None for a layer that keeps none (one
        reading an earlier layer's keys and values: Gemma-3n's and Gemma-4's shared-KV layers)."""
        return [None if layer.k is None else layer.window(self.rows) for layer in self.layers]

    def row(self, i: int, start: int, stop: int) -> RowKV:
        """Row `i`'s keys and values of columns start..stop (views)."""
        return [None if pair is None else (pair[0][i, :, start:stop], pair[1][i, :, start:stop])
                for pair in self.tensors()]

    @classmethod
    def from_tensors(cls, kv: list[tuple[torch.Tensor, torch.Tensor] | None], length: int,
                     max_length: int) -> "KVCache":
        cache = cls(len(kv), max_length)
        for layer, pair in zip(cache.layers, kv):
            if pair is not None:
                layer.k, layer.v = pair
                layer.is_initialized = True
        cache.length = length
        return cache

    def select(self, rows: torch.Tensor, start: int) -> "KVCache":
        """A new cache of `rows` (a row may repeat) and the columns from `start` on."""
        def keep(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, rows)[:, :, start:].contiguous()
        return KVCache.from_tensors([None if pair is None else (keep(pair[0]), keep(pair[1]))
                                     for pair in self.tensors()], self.length - start, self.max_length)

    def compact(self, order: list[int], start: int, peak: int) -> None:
        """In place: the batch's row i becomes its row `order[i]`, and its columns before `start` are dropped
        (pad columns no row needs any more): only rows that move are copied (the engine fills the places of leaving
        rows with the last rows). The places rows left, and the columns dropped, are kept for rows that join later
        while the buffers hold at most twice what the rows left may grow to (`peak` columns each, their planned
        peak); beyond, the buffers shrink to those rows."""
        moves = [(i, j) for i, j in enumerate(order) if i != j]
        filled = self._filled()
        if moves and filled:
            to = torch.tensor([i for i, _ in moves], device=filled[0].k.device)
            source = torch.tensor([j for _, j in moves], device=filled[0].k.device)
            for layer in filled:
                k, v = layer.window(None)
                k.index_copy_(0, to, k.index_select(0, source))
                v.index_copy_(0, to, v.index_select(0, source))
        for layer in filled:
            layer.first += start
        self.length -= start
        self.rows = len(order)
        if filled and filled[0].k.shape[0] * filled[0].k.shape[2] > 2 * self.rows * peak:
            self.shrink(peak)

    def shrink(self, peak: int) -> None:
        """New buffers of the batch's rows and window only (with the room the next step would grow them to, up to
        `peak`, what its rows may grow to): the places and columns rows left are given back."""
        self.max_length = peak
        rows = self.size()
        for layer in self._filled():
            layer.repack(rows, grown(self.length, self.length, peak), layer.k, layer.v)

    def place(self, other: "KVCache", other_rows: torch.Tensor | None = None) -> bool:
        """In place, where the buffers have room: `other`'s rows (by `other_rows`: the row of `other` each takes)
        join after the batch's, right-aligned. A longer `other` widens the window to the left where its buffers
        have those columns (left by rows that left); the columns it adds are pads, zeroed, as are the joining
        rows' pads (rows that left may have held anything there). False, nothing changed, where there is no room:
        the caller merges into new buffers. (A batch's cache always has buffers: a model keeping no keys and values
        is refused at start.)"""
        filled, rows = self._filled(), self.size()
        count = other.size() if other_rows is None else other_rows.shape[0]
        widen = max(0, other.length - self.length)
        if rows + count > filled[0].k.shape[0] or any(layer.first < widen for layer in filled):
            return False
        theirs = [pair if pair is None or other_rows is None else
                  (pair[0].index_select(0, other_rows), pair[1].index_select(0, other_rows))
                  for pair in other.tensors()]  # (copies allocated before anything changes)
        for layer in filled:
            layer.first -= widen
            layer.k[:rows, :, layer.first:layer.first + widen] = 0
            layer.v[:rows, :, layer.first:layer.first + widen] = 0
        self.length += widen
        pads = self.length - other.length
        for layer, pair in zip(self.layers, theirs):
            if layer.k is not None and pair is not None:
                k, v = layer.window(rows + count)
                k[rows:, :, :pads], v[rows:, :, :pads] = 0, 0
                k[rows:, :, pads:], v[rows:, :, pads:] = pair
        self.rows = rows + count
        return True

    @staticmethod
    def merge(a: "KVCache", b: "KVCache", max_length: int, b_rows: torch.Tensor | None = None) -> "KVCache":
        """Stack two batches' rows, right-aligned on a common length (the shorter one padded on the left), in
        buffers with the room the next decode step would grow them to (one copy of the cache instead of two).
        `max_length`: the merged batch's cap (its planned peak). `b_rows`: `b`'s rows in the merged batch, by their
        row in `b` (rows that shared a prompt's prefill: each copied from it, one layer at a time)."""
        length = max(a.length, b.length)
        capacity = grown(length, length, max_length)
        cache = KVCache(len(a.layers), max_length)
        for layer, pair_a, pair_b in zip(cache.layers, a.tensors(), b.tensors()):
            if pair_a is None or pair_b is None:  # a layer keeping no keys and values keeps none in either
                continue
            (ka, va), (kb, vb) = pair_a, pair_b
            if b_rows is not None:
                kb, vb = kb.index_select(0, b_rows), vb.index_select(0, b_rows)
            rows = ka.shape[0] + kb.shape[0]
            # a value's width is its own (multi-head latent attention caches keys and values of different widths)
            k = ka.new_zeros(rows, ka.shape[1], capacity, ka.shape[3])
            v = va.new_zeros(rows, va.shape[1], capacity, va.shape[3])
            n = ka.shape[0]
            k[:n, :, length - a.length:length], v[:n, :, length - a.length:length] = ka, va
            k[n:, :, length - b.length:length], v[n:, :, length - b.length:length] = kb, vb
            layer.k, layer.v, layer.is_initialized = k, v, True
        cache.length = length
        return cache

"""KV cache for a left-padded batch: per-layer buffers [B, H, capacity, D] that grow geometrically.

transformers' DynamicLayer concatenates the whole cache at every step; here a step writes one
column in place and attention reads a view. All rows share the time axis (right-aligned, pads on
the left), which is what lets rows join (`merge`) and leave (`select`) between steps.
"""
from __future__ import annotations

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
    def __init__(self, cache: "KVCache") -> None:
        super().__init__()
        self._cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        t0 = self._cache.length
        t1 = t0 + key_states.shape[-2]
        if self.k is None or self.k.shape[2] < t1:
            self._grow(key_states, value_states, t1)
        self.k[:, :, t0:t1] = key_states
        self.v[:, :, t0:t1] = value_states
        self.is_initialized = True
        return self.k[:, :, :t1], self.v[:, :, :t1]

    def _grow(self, key_states, value_states, needed: int) -> None:
        # The first allocation (a prefill, whose cache's max_length is its prompts' length) is exactly the prompts,
        # also when they run in chunks: the engine caps the batch at its planned peak only once they ran, and that
        # can be shorter than a rounded-up buffer. Later growth doubles, up to the cap.
        if self.k is None:
            capacity = max(needed, self._cache.max_length)
        else:
            capacity = grown(self.k.shape[2], needed, self._cache.max_length)
        k = key_states.new_zeros(*key_states.shape[:2], capacity, key_states.shape[-1])
        v = value_states.new_zeros(*value_states.shape[:2], capacity, value_states.shape[-1])
        if self.k is not None:
            t = self._cache.length
            k[:, :, :t] = self.k[:, :, :t]
            v[:, :, :t] = self.v[:, :, :t]
        self.k, self.v = k, v

    def get_seq_length(self) -> int:
        return self._cache.length


class KVCache(Cache):
    """`length` is the shared number of filled columns; the batch advances it after each forward.
    `max_length` caps how far the buffers grow: the engine lowers it to the running batch's planned peak, so
    the buffers stay within what admission reserved (--max-kv-tokens), apart from the moment a merge, trim or
    growth copies them (old and new buffers alive together)."""

    def __init__(self, num_layers: int, max_length: int) -> None:
        super().__init__(layers=[_Layer(self) for _ in range(num_layers)])
        self.length = 0
        self.max_length = max_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def allocated(self) -> tuple[int, int]:
        """(token slots, bytes) held by the buffers: rows x capacity, and every layer's K and V."""
        filled = [layer for layer in self.layers if layer.k is not None]
        if not filled:
            return 0, 0
        slots = filled[0].k.shape[0] * filled[0].k.shape[2]
        # keys and values may differ in width (multi-head latent attention: DeepSeek-V2/V3, MiniCPM3)
        return slots, sum(t.numel() * t.element_size() for layer in filled for t in (layer.k, layer.v))

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's filled keys and values; None for a layer that keeps none (one reading an earlier layer's
        keys and values: Gemma-3n's and Gemma-4's shared-KV layers)."""
        return [None if layer.k is None else (layer.k[:, :, :self.length], layer.v[:, :, :self.length])
                for layer in self.layers]

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
        """Keep `rows` and the columns from `start` on (dropping pad columns no row needs)."""
        def keep(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, rows)[:, :, start:].contiguous()
        return KVCache.from_tensors([None if pair is None else (keep(pair[0]), keep(pair[1]))
                                     for pair in self.tensors()], self.length - start, self.max_length)

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

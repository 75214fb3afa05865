"""Keys and values of token sequences already run, kept for later requests whose prompts start the same way
(--prefix-cache-tokens): a system prompt, few-shot examples, the earlier turns of a chat.

Sequences are cut in blocks of BLOCK tokens. A block is keyed by its tokens and the block before it (the first block
by its root: the adapter's weights and the request's cache salt, server/prompt_sharing.cache_key: an adapter changes
every layer's keys and values), so a key names its whole prefix exactly: no hashes, whose collisions would hand a
request another prompt's keys and values. Blocks live in one pool per layer,
[heads, blocks, BLOCK, head dim], of a fixed number of blocks allocated at start; the least recently used block goes
first. A lookup or store touches a sequence's blocks last to first, so a block is never older than the blocks after
it, and the oldest block is always one nothing else starts with: evicting it leaves every other sequence whole.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from server.config import PREFIX_BLOCK as BLOCK  # a sequence's last partial block is run again, never looked up


@dataclass(eq=False)
class Block:
    index: int   # its place in the pools
    serial: int  # the next block's key names it by this: never reused, unlike `index`
    alive: bool = True


class PrefixCache:
    def __init__(self, tokens: int, layers: list[tuple[torch.Size, torch.Size, torch.dtype] | None],
                 device: torch.device) -> None:
        """`tokens`: the pools' size (whole blocks); `layers`: each layer's (key shape, value shape, dtype) of one
        row's cache, [heads, positions, head dim], or None for a layer that keeps no keys and values."""
        self.capacity = tokens // BLOCK
        self._pools = [None if layer is None else tuple(
            torch.empty(shape[0], self.capacity, BLOCK, shape[-1], dtype=layer[2], device=device)
            for shape in layer[:2]) for layer in layers]
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()  # key -> block, least recently used first
        self._free = list(range(self.capacity - 1, -1, -1))
        self._serials = itertools.count()
        self.device = device

    def _index(self, indices: list[int]) -> torch.Tensor:
        """Pool indices on the pools' device; to a GPU from pinned memory, without waiting for it (a copy from pageable
        memory waits for the GPU's queue: a finishing row's store would hold up the decode step)."""
        index = torch.tensor(indices, dtype=torch.long)
        return index.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else index

    @staticmethod
    def bytes_per_token(layers: list[tuple[torch.Size, torch.Size, torch.dtype] | None]) -> int:
        return sum((k[0] * k[-1] + v[0] * v[-1]) * dtype.itemsize for k, v, dtype in filter(None, layers))

    @property
    def tokens(self) -> int:
        """Tokens held."""
        return len(self._blocks) * BLOCK

    def _held(self, root: tuple | None, tokens: list[int], blocks: int) -> list[tuple[tuple, Block]]:
        """(key, block) of the held blocks the first `blocks` blocks of `tokens` start with, touched."""
        held, parent = [], ("root", root)
        for start in range(0, blocks * BLOCK, BLOCK):
            key = (parent, tuple(tokens[start:start + BLOCK]))
            block = self._blocks.get(key)
            if block is None:
                break
            held.append((key, block))
            parent = block.serial
        self._touch([key for key, _ in held])
        return held

    def _touch(self, keys: list[tuple]) -> None:
        """Last to first: a block is never older than the blocks after it."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def match(self, root: tuple | None, prompt: list[int]) -> list[Block]:
        """The held blocks `prompt` starts with, leaving at least its last token to run (its logits are needed)."""
        return [block for _, block in self._held(root, prompt, (len(prompt) - 1) // BLOCK)]

    def gather(self, blocks: list[Block], n: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's keys and values [heads, n, head dim] of the first `n` tokens of `blocks`."""
        if not all(b.alive for b in blocks):  # its pool rows may hold another sequence now
            raise RuntimeError("a prefix block was evicted between its lookup and its use")
        index = self._index([b.index for b in blocks[:-(-n // BLOCK)]])

        def take(pool: torch.Tensor) -> torch.Tensor:
            return pool.index_select(1, index).flatten(1, 2)[:, :n]
        return [None if pools is None else (take(pools[0]), take(pools[1])) for pools in self._pools]

    def store(self, root: tuple | None, tokens: list[int],
              kv: list[tuple[torch.Tensor, torch.Tensor] | None]) -> int:
        """Keep the whole blocks of `tokens`, whose keys and values are `kv` (each layer's [heads, len(tokens),
        head dim], or None); blocks already held are only touched. Returns the blocks added."""
        blocks = min(len(tokens) // BLOCK, self.capacity)
        held = self._held(root, tokens, blocks)  # the most recent now: the evictions below take other blocks
        added, parent = [], held[-1][1].serial if held else ("root", root)
        for start in range(len(held) * BLOCK, blocks * BLOCK, BLOCK):
            if not self._free:
                _, old = self._blocks.popitem(last=False)
                old.alive = False
                self._free.append(old.index)
            block = Block(self._free.pop(), next(self._serials))
            added.append(((parent, tuple(tokens[start:start + BLOCK])), block))
            parent = block.serial
        if not added:
            return 0
        first, index = len(held) * BLOCK, self._index([b.index for _, b in added])
        try:
            for pools, pair in zip(self._pools, kv):
                for pool, t in zip(pools or (), pair or ()):
                    pool.index_copy_(1, index, t[:, first:first + len(added) * BLOCK].unflatten(1, (len(added), BLOCK)))
        except BaseException:
            self._free.extend(block.index for _, block in added)
            raise
        self._blocks.update(added)
        self._touch([key for key, _ in held + added])
        return len(added)

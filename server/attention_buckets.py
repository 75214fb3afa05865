"""Decode attention over each row's own columns, not the batch's whole width.

The batch's rows share one time axis, right-aligned, so its width is the longest row's: one row of 2000 tokens among
short ones makes every row's attention read 2000 columns of keys and values, almost all of them padding it masks.
In a decode step that traffic is most of the step's (a row's keys and values are read once per token, the weights
once per step): 15 rows of 100 tokens and one of 2000 took 2.1-2.3 times the step of 16 rows of 100 on the
benchmark model, and 1.2-1.3 times grouped (bench/RESULTS.md, "attention_width").

So a decode step whose rows' lengths are far apart splits them into groups of similar length (`plan`), and
SDPA runs per group over the group's longest row's columns only, the last ones of the axis. A masked column adds
exactly 0 to a row's softmax, so the result is the row's own attention, as it gets alone (its float sums run over
fewer blocks). Gathering a group's rows copies their columns (a row alone is a view), which the plan weighs.

The wrapper is registered as transformers' "sdpa" attention function and calls the one it replaces, unchanged, for
every call but the decode steps of a batch that set groups (a thread-local: each server's engine thread its own).
Only on the CPU, where it is measured; models on eager attention (Gemma-2) or their own SDPA calls keep theirs.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CALL = 1024  # the cost of one more SDPA call, in row-columns of attention (bench/attention_width.py: 16 rows of
# 100-2000 columns spread evenly, each alone, were no faster than one call over 2000)
JUMP = 1.25  # the sorted rows are cut into groups only where a row is this much longer than the one before
WORTH = 0.75  # groups are used where they cost at most this share of one call over the whole width

_local = threading.local()


def plan(lengths: list[int]) -> list[list[int]] | None:
    """Row indices in groups of similar `lengths` (each row's real columns), or None where one call over the longest
    is about as cheap. A gathered group reads its longest row's columns for each of its rows three times (copied
    out, copied in, attended), a row alone once (a view); each call costs CALL more."""
    n, longest = len(lengths), max(lengths)
    one_call = n * longest + CALL
    if sum(lengths) + CALL > WORTH * one_call:  # every row over its own columns alone would save too little
        return None
    order = sorted(range(n), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    cuts = [0] + [i for i in range(1, n) if sizes[i] > JUMP * sizes[i - 1]] + [n]  # block k: cuts[k] to cuts[k + 1]

    def gathered(a: int, b: int) -> int:  # the sorted rows a..b-1 in one call
        rows = b - a
        return (rows if rows in (1, n) else 3 * rows) * sizes[b - 1] + CALL

    # best[k]: the least cost of the first k blocks, and how its last group is made: (first block, each row alone)
    best: list[tuple[int, tuple[int, bool]]] = [(0, (0, False))]
    for k in range(1, len(cuts)):
        together = [(best[j][0] + gathered(cuts[j], cuts[k]), (j, False)) for j in range(k)]
        alone = best[k - 1][0] + sum(sizes[cuts[k - 1]:cuts[k]]) + CALL * (cuts[k] - cuts[k - 1])
        best.append(min(together + [(alone, (k - 1, True))]))
    if best[-1][0] > WORTH * one_call:
        return None
    groups, k = [], len(cuts) - 1
    while k > 0:
        j, single = best[k][1]
        rows = order[cuts[j]:cuts[k]]
        groups = ([[r] for r in rows] if single else [rows]) + groups
        k = j
    return groups


@contextmanager
def grouped(groups: list[tuple[torch.Tensor | int, int]] | None):
    """Within it, decode attention on this thread runs per group: (row indices, or a row's index, and its width)."""
    _local.groups = groups
    try:
        yield
    finally:
        _local.groups = None


def install() -> None:
    """Wrap transformers' SDPA attention function (once per process)."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, "wrapped", None) is not None:
        return

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        groups = getattr(_local, "groups", None)
        # (a per-row position_bias, as some models pass, is not sliced per group: such a model runs one call)
        if groups is None or query.shape[2] != 1 or attention_mask is None or attention_mask.dim() != 4 \
                or attention_mask.shape[-1] != key.shape[2] or kwargs.get("position_bias") is not None:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        out = None
        for rows, width in groups:
            if isinstance(rows, int):  # a row alone: views
                part = slice(rows, rows + 1)
                q, k, v, m = (t[part] for t in (query, key[:, :, -width:], value[:, :, -width:],
                                                 attention_mask[..., -width:]))
            else:
                q, k, v, m = (t.index_select(0, rows) for t in (query, key[:, :, -width:], value[:, :, -width:],
                                                                 attention_mask[..., -width:]))
            got, _ = sdpa(module, q, k, v, m, *args, **kwargs)
            if out is None:
                out = got.new_empty((query.shape[0], *got.shape[1:]))
            if isinstance(rows, int):
                out[rows] = got[0]
            else:
                out.index_copy_(0, rows, got)
        return out, None

    attention.wrapped = sdpa
    ALL_ATTENTION_FUNCTIONS.register("sdpa", attention)

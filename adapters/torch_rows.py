"""The torch path for the adapter delta: batched matmuls over batch-ordered copies of the rows' factors.

Runs on any device and dtype; on CUDA it is the path in use, on CPU it is the oracle the native kernel is
tested against. Every row is padded to the batch's widest rank (and head count) per module: zero columns
add exactly nothing. The copies are made once per batch change (`TorchRows.gather`), not per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Route:
    """Per-row gating for one module: router [B, d_in, K] and bias [B, 1, K] (fp32); z[c] = a[j[c]] · g[k[c]]."""

    router: torch.Tensor
    bias: torch.Tensor
    j: torch.Tensor  # [B, 1, W] shrink column feeding expand column c
    k: torch.Tensor  # [B, 1, W] head gating expand column c


@dataclass(frozen=True)
class TorchRows:
    """Per adapted module (by index): A^T rows [B, d_in, r], B^T rows [B, W, d_out] and an optional Route;
    None when no row of the batch adapts the module."""

    a: list[torch.Tensor | None]
    b: list[torch.Tensor | None]
    route: list[Route | None]
    rows: int

    @classmethod
    def gather(cls, bank, slots: list[int]) -> TorchRows:
        host_idx = torch.tensor(slots, dtype=torch.long)
        idx = host_idx.to(bank.device)
        ranks, heads = bank.ranks.index_select(1, host_idx), bank.heads.index_select(1, host_idx)
        dtype = bank.delta_dtype
        a, b, route = [], [], []
        for i, (r, k, w) in enumerate(zip(ranks.amax(1).tolist(), heads.amax(1).tolist(),
                                          (ranks * heads).amax(1).tolist())):
            if r == 0:
                a.append(None), b.append(None), route.append(None)
                continue
            a_t = bank.a[i][:, :r, :].index_select(0, idx).transpose(1, 2)  # [B, d_in, r]: bmm's fast layout on CPU
            a.append(a_t.to(dtype).contiguous())
            b.append(bank.b[i][:, :w, :].index_select(0, idx).to(dtype))
            route.append(None if k == 1 else _route(bank, i, idx, ranks[i].long(), k, w))
        return cls(a, b, route, len(slots))

    def add_delta(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.a[index]
        if a is None:
            return y
        b, route = self.b[index], self.route[index]
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1])
        z = torch.bmm(x3.to(a.dtype), a)                                  # shrink: [B, T, r]
        if route is not None:                                              # per-token gate (HydraLoRA)
            gate = (torch.bmm(x3.float(), route.router) + route.bias).softmax(-1).to(z.dtype)   # [B, T, K]
            shape = (batch, z.shape[1], route.j.shape[-1])
            z = z.gather(-1, route.j.expand(shape)) * gate.gather(-1, route.k.expand(shape))  # g ⊗ a: [B, T, K·r]
        out = y.view(batch, -1, y.shape[-1])
        if out.dtype == z.dtype:  # expand, added in place into the fresh base output: one pass instead of bmm + add
            out.baddbmm_(z, b)
        else:  # float32 factors on a half-precision model: added in float32, rounded once
            out.copy_(torch.baddbmm(out.float(), z, b))
        return y


def _route(bank, i: int, idx: torch.Tensor, ranks: torch.Tensor, k: int, w: int) -> Route:
    column = torch.arange(w)
    own = ranks.clamp(min=1)[:, None]  # each row's own rank: head h fills columns [h·r, (h+1)·r)
    j = torch.minimum(column % own, own - 1)
    h = (column // own).clamp(max=k - 1)
    return Route(bank.g[i][:, :k, :].index_select(0, idx).transpose(1, 2).contiguous(),
                 bank.g_bias[:, i, :k].index_select(0, idx)[:, None, :],
                 j[:, None, :].to(bank.device), h[:, None, :].to(bank.device))

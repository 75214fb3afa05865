"""The adapted linear layer: base(x) plus every row's own adapter delta, for all rows at once."""
from __future__ import annotations

import torch
from torch import nn

from adapters.canonical import ModuleFactors
from adapters.slot_bank import AdapterContext


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (d_in, d_out))."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        d_in, d_out = base.weight.shape
        return d_in, d_out
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D are supported")


class MultiAdapterLinear(nn.Module):
    """Wraps a frozen base layer. The delta is two batched matmuls over batch-ordered factors:
    no Python loop over adapters, no per-step gather. Rows without an adapter carry zero factors."""

    def __init__(self, base: nn.Module, index: int, context: AdapterContext) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.context.rows
        if rows is None:
            return y
        a = rows.a[self.index]
        if a is None:
            return y
        batch = x.shape[0]
        xa = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a.dtype), a)  # [B, T, r]
        delta = torch.bmm(xa, rows.b[self.index])                         # [B, T, d_out]
        return y + delta.view(y.shape).to(y.dtype)


def reference_delta(x: torch.Tensor, factors: list[ModuleFactors | None], d_out: int) -> torch.Tensor:
    """Test oracle: a plain per-row loop, delta[i] = B_i (A_i x_i), zero for rows without an adapter. x: [B, T, d_in]."""
    rows = [x.new_zeros(x.shape[1], d_out) if f is None else x[i] @ f.a.t().to(x.dtype) @ f.b.t().to(x.dtype)
            for i, f in enumerate(factors)]
    return torch.stack(rows)

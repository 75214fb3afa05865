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


def dense_weight(base: nn.Module) -> torch.Tensor:
    """fp32 copy of an nn.Linear or Conv1D weight in (d_out, d_in) layout."""
    weight = base.weight.detach().float()
    return (weight.t() if type(base).__name__ == "Conv1D" else weight).clone()


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
        if rows is None or rows.a[self.index] is None:
            return y
        a, b, route = rows.a[self.index], rows.b[self.index], rows.route[self.index]
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1])
        z = torch.bmm(x3.to(a.dtype), a)                                  # shrink: [B, T, r]
        if route is not None:                                              # per-token gate (HydraLoRA)
            gate = (torch.bmm(x3.float(), route.router) + route.bias).softmax(-1).to(z.dtype)   # [B, T, K]
            shape = (batch, z.shape[1], route.j.shape[-1])
            z = z.gather(-1, route.j.expand(shape)) * gate.gather(-1, route.k.expand(shape))  # g ⊗ a: [B, T, K·r]
        # expand, added in place into the fresh base output: one pass instead of bmm + add
        y.view(batch, -1, y.shape[-1]).baddbmm_(z, b)
        return y


def reference_delta(x: torch.Tensor, factors: list[ModuleFactors | None], d_out: int) -> torch.Tensor:
    """Test oracle: a plain per-row loop over the canonical form, zero for rows without an adapter. x: [B, T, d_in]."""
    rows = []
    for xi, f in zip(x, factors):
        if f is None:
            rows.append(xi.new_zeros(xi.shape[0], d_out))
            continue
        h = xi @ f.a.t()                                                     # [T, r]
        if f.router is not None:
            logits = xi.float() @ f.router.t().float()
            if f.router_bias is not None:
                logits = logits + f.router_bias
            g = logits.softmax(-1).to(xi.dtype)                             # [T, K]
            h = (g[:, :, None] * h[:, None, :]).reshape(xi.shape[0], -1)     # [T, K·r], head-major
        rows.append(h @ f.b.t())
    return torch.stack(rows)

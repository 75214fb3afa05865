"""The adapted linear layer: base(x) plus every row's own adapter delta, for all rows at once."""
from __future__ import annotations

import torch
from torch import nn

from adapters.canonical import ModuleFactors
from adapters.slot_bank import AdapterContext, ModuleShape


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (d_in, d_out))."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        d_in, d_out = base.weight.shape
        return d_in, d_out
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D are supported")


def stored_transposed(base: nn.Module) -> bool:
    """Whether the layer stores its weight (d_in, d_out), as GPT-2's Conv1D does (PEFT's fan_in_fan_out)."""
    return not isinstance(base, nn.Linear)


def module_shape(name: str, base: nn.Module) -> ModuleShape:
    return ModuleShape(name, *linear_dims(base), stored_transposed=stored_transposed(base))


def dense_weight(base: nn.Module) -> torch.Tensor:
    """fp32 copy of an nn.Linear or Conv1D weight in (d_out, d_in) layout."""
    weight = base.weight.detach().float()
    return (weight.t() if stored_transposed(base) else weight).clone()


class MultiAdapterLinear(nn.Module):
    """Wraps a frozen base layer: base(x) plus each row's own adapter delta, all rows in one call (no Python
    loop over adapters). How the delta is computed is the batch's RowFactors' business (slot_bank.gather)."""

    def __init__(self, base: nn.Module, index: int, context: AdapterContext) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.context = context

    # Model code may read the layer's parameters beside calling it (Hunyuan-MoE's router casts to `wg.weight.dtype`),
    # as PEFT's wrappers allow: the frozen base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.context.rows
        if rows is None:
            return y
        if x.dim() != 3:
            # Flattened to [rows·T, d] (OPT's MLP), or with more axes, [rows, ..., d] (MLA's kv_b_proj, on [rows, 1,
            # T, rank]): either way each row's tokens are one run, in row order
            if x.shape[0] % rows.rows or (x.dim() > 3 and x.shape[0] != rows.rows):
                raise ValueError(f"an adapted layer got input {tuple(x.shape)} for {rows.rows} rows")
            return rows.add_delta(self.index, x.reshape(rows.rows, -1, x.shape[-1]),
                                  y.reshape(rows.rows, -1, y.shape[-1])).view(y.shape)
        return rows.add_delta(self.index, x, y)


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

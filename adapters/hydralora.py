"""HydraLoRA (arXiv 2404.19245), trainable: one shared A, K expand heads B_i, a per-layer router.

    y = W0 x + s · Σ_i ω_i(x) B_i A drop_i(x),   ω = softmax(W_g x) per token, computed in fp32

Dense soft routing over all heads, no top-k and no auxiliary loss (reference/methods.md §4.2–4.3).
Init as the reference: A and W_g Kaiming-uniform (nn.Linear default), every B_i zero, so the model
starts as the base. Each head draws its own dropout mask in training (the reference's per-head loop);
at inference A x is computed once. The served form is `canonical()`: b = s·[B_1 … B_K].
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.canonical import ModuleFactors, lora_scaling
from adapters.layer import linear_dims
from adapters.lora import wrap_modules


class HydraLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, heads: int, dropout: float = 0.0,
                 router_bias: bool = False, use_rslora: bool = False) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        self.base = base
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(heads))
        for head in self.lora_B:
            nn.init.zeros_(head.weight)
        self.lora_route = nn.Linear(d_in, heads, bias=router_bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(alpha, r, use_rslora)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token head weights [..., K]; the router reads the undropped input, in fp32."""
        route = self.lora_route
        return nn.functional.linear(x.float(), route.weight.float(),
                                    None if route.bias is None else route.bias.float()).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xa = x.to(self.lora_A.weight.dtype)
        gate = self.gate(x).to(xa.dtype)
        per_head = self.training and not isinstance(self.dropout, nn.Identity)
        shared = None if per_head else self.lora_A(self.dropout(xa))
        delta = 0
        for i, head in enumerate(self.lora_B):
            h = self.lora_A(self.dropout(xa)) if per_head else shared
            delta = delta + gate[..., i:i + 1] * head(h)
        return (y + delta * self.scaling).to(y.dtype)  # one rounding, as LoraLinear

    def canonical(self) -> ModuleFactors:
        b = torch.cat([head.weight for head in self.lora_B], dim=1) * self.scaling
        bias = self.lora_route.bias
        return ModuleFactors(self.lora_A.weight.detach().float().clone(), b.detach().float().contiguous(),
                             self.lora_route.weight.detach().float().clone(),
                             None if bias is None else bias.detach().float().clone())


def add_hydralora(model: nn.Module, targets, r: int, alpha: float, heads: int, dropout: float = 0.0,
                  router_bias: bool = False, use_rslora: bool = False) -> dict[str, HydraLoraLinear]:
    """Wrap every targeted linear module of `model` in place; returns them by module path."""
    return wrap_modules(model, targets,
                        lambda m: HydraLoraLinear(m, r, alpha, heads, dropout, router_bias, use_rslora))

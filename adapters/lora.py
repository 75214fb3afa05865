"""LoRA (arXiv 2106.09685), trainable, initialised and scaled exactly as HF PEFT does.

    y = W0 x + s · B A drop(x),   s = alpha / r  (alpha / sqrt(r) with rsLoRA)
A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default, PEFT's `init_lora_weights=True`), B = 0, so the
model starts as the base. Parameter names match PEFT's (`lora_A.weight`, `lora_B.weight`).
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.canonical import ModuleFactors, lora_scaling
from adapters.layer import linear_dims
from adapters.targets import linear_modules


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        self.base = base
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(alpha, r, use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return (y + delta * self.scaling).to(y.dtype)  # as PEFT: one rounding to a half-precision base's dtype

    def canonical(self) -> ModuleFactors:
        return ModuleFactors(self.lora_A.weight.detach().float().clone(),
                             (self.lora_B.weight.detach().float() * self.scaling).contiguous())


def wrap_modules(model: nn.Module, targets, make) -> dict[str, nn.Module]:
    """Replace every targeted linear module with `make(module)` in place; returns the wrappers by path."""
    wrapped = {}
    for name, module in linear_modules(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[name] = make(module)
        setattr(parent, child, wrapped[name])
    if not wrapped:
        raise ValueError(f"no linear module of the model matches target modules {targets!r}")
    return wrapped


def add_lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0,
             use_rslora: bool = False) -> dict[str, LoraLinear]:
    return wrap_modules(model, targets, lambda m: LoraLinear(m, r, alpha, dropout, use_rslora))

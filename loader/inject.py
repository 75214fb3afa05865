"""Replace the base model's target linear layers with multi-adapter layers sharing one context."""
from __future__ import annotations

import torch
from torch import nn

from adapters.layer import MultiAdapterLinear, dense_weight, module_shape
from adapters.slot_bank import AdapterContext, ModuleShape
from adapters.targets import ALL_LINEAR, linear_modules


def unmatched_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The target-module names (a list's entries, or one pattern) that match no adaptable module of `model`."""
    if isinstance(targets, list):
        return [t for t in targets if not linear_modules(model, [t])]
    return [] if linear_modules(model, targets) else [targets]


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's adaptable linear modules (what a target list may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, _ in linear_modules(model, ALL_LINEAR)})


def unmatched_problem(model: nn.Module, targets: str | list[str], named: str = "--target-modules") -> str | None:
    """Why `targets` cannot be adapted as asked (`named`: where they come from), or None: each name must match a
    module, since one that matches nothing would silently adapt less (a typo, or a list meant for another model
    family). Training refuses such a job with this line; `loraplex serve` warns with it."""
    unmatched = unmatched_targets(model, targets)
    if not unmatched:
        return None
    return (f"{named}: {', '.join(map(str, unmatched))} matches no adaptable linear module of this model (the output "
            f"head and embeddings are never adapted); its linear modules are named {linear_module_names(model)}")


def inject(model: nn.Module, targets: str | list[str] = ALL_LINEAR) -> tuple[AdapterContext, list[ModuleShape]]:
    found = linear_modules(model, targets)
    if not found:
        raise ValueError(f"{targets} matches no adaptable linear module of the model; its linear modules are named "
                         f"{linear_module_names(model)}")
    context = AdapterContext()
    shapes = []
    for index, (name, module) in enumerate(found):
        shapes.append(module_shape(name, module))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiAdapterLinear(module, index, context))
    return context, shapes


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """fp32 copy of an adapted module's frozen weight in (d_out, d_in) layout (Conv1D stores (d_in, d_out))."""
    module = model.get_submodule(name)
    return dense_weight(module.base if isinstance(module, MultiAdapterLinear) else module)

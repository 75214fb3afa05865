"""Replace the base model's target linear layers with multi-adapter layers sharing one context."""
from __future__ import annotations

import re

from torch import nn

from adapters.layer import MultiAdapterLinear, linear_dims
from adapters.slot_bank import AdapterContext, ModuleShape

ALL_LINEAR = "all-linear"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def adaptable_modules(model: nn.Module, targets: str | list[str] = ALL_LINEAR) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D modules the server can adapt. `all-linear` means every one but the output head;
    a list keeps modules whose name is, or ends with, an entry; a string is a full-match regex (PEFT's rule)."""
    output = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not _is_linear(module) or module is output:
            continue
        if targets == ALL_LINEAR:
            ok = True
        elif isinstance(targets, str):
            ok = re.fullmatch(targets, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in targets)
        if ok:
            found.append((name, module))
    return found


def inject(model: nn.Module, targets: str | list[str] = ALL_LINEAR) -> tuple[AdapterContext, list[ModuleShape]]:
    context = AdapterContext()
    shapes = []
    for index, (name, module) in enumerate(adaptable_modules(model, targets)):
        d_in, d_out = linear_dims(module)
        shapes.append(ModuleShape(name, d_in, d_out))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiAdapterLinear(module, index, context))
    if not shapes:
        raise ValueError(f"no linear module of the model matches target modules {targets!r}")
    return context, shapes

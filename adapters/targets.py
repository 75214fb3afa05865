"""Which linear modules an adapter targets: PEFT's matching rule, shared by serving and training."""
from __future__ import annotations

import re

from torch import nn

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(spec: str | list[str] | None, name: str) -> bool:
    """A string is a full-match regex (or 'all-linear'); a list matches a name or its dotted suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec == ALL_LINEAR or re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def linear_modules(model: nn.Module, spec: str | list[str] = ALL_LINEAR,
                   exclude: str | list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D modules matching `spec`, never the output head."""
    output = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if is_linear(m) and m is not output and matches(spec, name) and not matches(exclude, name)]

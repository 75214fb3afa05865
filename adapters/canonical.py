"""The one form every adapter kind is served in: per module, shrink A then expand B (scaling folded)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

import torch


class AdapterKind(Enum):
    LORA = "lora"
    ADALORA = "adalora"
    HYDRALORA = "hydralora"
    RESLORA = "reslora"


@dataclass(frozen=True)
class ModuleFactors:
    """delta(x) = b @ (a @ x). a: (r, d_in); b: (d_out, r) with the adapter's scaling already folded in."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class CanonicalAdapter:
    """An adapter ready for a slot: host tensors (fp32) keyed by the module path inside the HF model."""

    adapter_id: str
    kind: AdapterKind
    modules: dict[str, ModuleFactors]
    # Unique per read from disk: a replaced (or re-read) adapter gets a new key, so running rows keep theirs.
    load_serial: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.load_serial)

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)

    @property
    def size_bytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for f in self.modules.values())


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def resolve_pattern(pattern: dict | None, module: str, default):
    """PEFT's per-module override rule: the first key (a regex) matching `(.*\\.)?(key)$` wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default

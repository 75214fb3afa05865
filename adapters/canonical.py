"""The one form every adapter kind is served in: per module, shrink A then expand B (scaling folded)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

import torch

from adapters.targets import SlowPattern, pattern_matches


class AdapterKind(Enum):
    LORA = "lora"
    ADALORA = "adalora"
    HYDRALORA = "hydralora"
    RESLORA = "reslora"


@dataclass(frozen=True)
class ModuleFactors:
    """shrink -> optional per-token gate -> expand, scaling folded into b.

    a: (r, d_in). Without a router, b: (d_out, r) and delta(x) = b (a x).
    With a router (HydraLoRA, K heads): router: (K, d_in), router_bias: (K,) or None, b: (d_out, K·r) = [B_1 … B_K],
    and delta(x) = b (g ⊗ a x) with g = softmax(router x + bias) per token, in fp32.
    """

    a: torch.Tensor
    b: torch.Tensor
    router: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def heads(self) -> int:
        return 1 if self.router is None else self.router.shape[0]

    @property
    def width(self) -> int:
        """Columns of the expand: K·r."""
        return self.b.shape[1]


@dataclass(frozen=True)
class CanonicalAdapter:
    """An adapter ready for a slot: host tensors (fp32) keyed by the module path inside the HF model."""

    adapter_id: str
    kind: AdapterKind
    modules: dict[str, ModuleFactors]
    # Unique per read from disk: a replaced (or re-read) adapter gets a new key, so running rows keep theirs.
    load_serial: int = 0
    metadata: dict = field(default_factory=dict)
    source: tuple = ()  # what the weights were read from (the registry's identity of the files); () unknown

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.load_serial)

    @property
    def weights_key(self) -> tuple:
        """Equal for adapters holding the same weights: read from the same files (again after an eviction, or loaded
        again after an unload), else this read only."""
        return (self.adapter_id, self.source or self.load_serial)

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)

    @property
    def max_heads(self) -> int:
        return max((f.heads for f in self.modules.values()), default=1)

    @property
    def size_bytes(self) -> int:
        tensors = [t for f in self.modules.values() for t in (f.a, f.b, f.router, f.router_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_regex(key: str) -> re.Pattern:
    """What PEFT matches module paths against for a rank_pattern/alpha_pattern key (re.error where the key is no
    regex; the wrapper may compile a key that alone does not, so this, not the key, is what to check)."""
    return re.compile(rf"(.*\.)?({key})$")


def resolve_pattern(pattern: dict | None, module: str, default, what: str = "rank_pattern"):
    """PEFT's per-module override rule: the first key (a regex) matching `(.*\\.)?(key)$` wins (SlowPattern naming
    `what` and the key where one runs too long)."""
    for key, value in (pattern or {}).items():
        try:
            if pattern_matches(what, pattern_regex(key).pattern, module, full=False):
                return value
        except SlowPattern as exc:
            raise SlowPattern(f"{what} key", key, module, exc.seconds) from None
    return default

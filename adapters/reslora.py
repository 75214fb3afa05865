"""ResLoRA (arXiv 2402.18039), trainable, and its merge into plain LoRA (reference/methods.md §3).

Chains link same-type blocks across depth: one chain per module path with the layer index removed
(e.g. every `self_attn.q_proj`), ordered by layer index. With block index n, m_n = min(pre_num, n):
    is:  h_n = W_n x_n + s B_n A_n drop(x_n + x_{n-1}),   x_{-1} := x_n
    bs:  h_n = W_n x_n + s Σ_{k=0}^{m_n} B_{n-k} A_{n-k} drop_{n-k}(x_n)
    ms:  h_n = W_n x_n + s B_n (A_n drop_n(x_n) + Σ_{k=1}^{m_n} xa_{n-k}),   xa_j = A_j drop_j(x_j)
Unlike the reference there is no hidden epoch gate, and training records the statistics the
approximate merges need (window means of ‖X_n‖_F and ‖A_n X_n‖_F), so they can be saved.
"""
from __future__ import annotations

import math
import re
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.canonical import ModuleFactors
from adapters.layer import dense_weight, linear_dims
from adapters.targets import linear_modules

STRUCTURES = ("is", "bs", "ms")
MERGE_METHODS = {"bs": ("exact",), "is": ("input_norm", "weight_norm"), "ms": ("input_norm", "modified_a")}
_LAYER = re.compile(r"\.(\d+)\.")


def in_a_block(module: str) -> bool:
    """Whether the module sits in a numbered block (model.layers.3....), where a ResLoRA chain can link it."""
    return _LAYER.search(module) is not None


def chain_position(module: str) -> tuple[str, int]:
    """('model.layers.*.self_attn.q_proj', 3) for 'model.layers.3.self_attn.q_proj'."""
    m = _LAYER.search(module)
    if m is None:
        raise ValueError(f"module {module!r} has no layer index, so it cannot join a ResLoRA chain")
    return module[:m.start()] + ".*." + module[m.end():], int(m.group(1))


def build_chains(modules: list[str]) -> list[list[str]]:
    by_key: dict[str, list[tuple[int, str]]] = {}
    for name in modules:
        key, index = chain_position(name)
        by_key.setdefault(key, []).append((index, name))
    return [[name for _, name in sorted(members)] for _, members in sorted(by_key.items())]


@dataclass
class _Chain:
    """Blocks of one chain and what the current forward stored for the later blocks."""

    blocks: list["ResLoraLinear"] = field(default_factory=list)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    shrunk: dict[int, torch.Tensor] = field(default_factory=dict)


class ResLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, structure: str, pre_num: int,
                 window: int = 100) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"ResLoRA structure must be one of {STRUCTURES}, got {structure!r}")
        d_in, d_out = linear_dims(base)
        self.base = base
        self.lora_A = nn.Linear(d_in, r, bias=False)  # Kaiming-uniform, as PEFT
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.structure, self.pre_num = structure, pre_num
        self.input_norms: deque[float | torch.Tensor] = deque(maxlen=window)
        self.shrunk_norms: deque[float | torch.Tensor] = deque(maxlen=window)
        self._chain: _Chain | None = None  # set by add_reslora; not a submodule (no double registration)
        self.index = 0
        self.merged: ModuleFactors | None = None  # when set, forward is the merged plain LoRA (to measure merges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged is not None:
            f = self.merged
            return (y + x.to(f.a.dtype) @ f.a.t() @ f.b.t()).to(y.dtype)
        chain, n = self._chain, self.index
        m = min(self.pre_num, n)
        xa_in = x.to(self.lora_A.weight.dtype)
        if self.structure == "is":
            prev = chain.inputs.get(n - 1, xa_in) if n > 0 else xa_in
            delta = self.lora_B(self.lora_A(self.dropout(xa_in + prev)))
        elif self.structure == "bs":
            delta = sum(b.lora_B(b.lora_A(b.dropout(xa_in))) for b in chain.blocks[n - m:n + 1])
        else:
            shrunk = self.lora_A(self.dropout(xa_in))
            chain.shrunk[n] = shrunk
            delta = self.lora_B(shrunk + sum(chain.shrunk[n - k] for k in range(1, m + 1)))
        chain.inputs[n] = xa_in
        if self.training:  # kept as tensors: a float() here would stop a GPU's queue twice per module per step
            with torch.no_grad():
                self.input_norms.append(xa_in.norm())
                self.shrunk_norms.append(self.lora_A(xa_in).norm())
        return (y + self.scaling * delta).to(y.dtype)  # one rounding, as LoraLinear

    def statistics(self) -> dict[str, float]:
        """Window means of ‖X‖_F and ‖A X‖_F over the last training forwards (NaN before any)."""
        mean = lambda values: sum(map(float, values)) / len(values) if values else math.nan  # noqa: E731
        return {"input_norm": mean(self.input_norms), "shrunk_norm": mean(self.shrunk_norms)}


def add_reslora(model: nn.Module, targets, r: int, alpha: float, dropout: float, structure: str,
                pre_num: int) -> dict[str, ResLoraLinear]:
    """Wrap targeted linear modules in place and link them into chains; returns them by module path."""
    found = dict(linear_modules(model, targets))
    if not found:
        raise ValueError(f"no linear module of the model matches target modules {targets!r}")
    wrapped = {}
    for names in build_chains(list(found)):
        chain = _Chain()
        for index, name in enumerate(names):
            layer = ResLoraLinear(found[name], r, alpha, dropout, structure, pre_num)
            layer._chain, layer.index = chain, index
            # weak: a block refers to its chain, and a cycle would keep a trained model (every block, the base
            # modules they wrap) after a job until Python's cyclic collector ran: many jobs in one process
            chain.blocks.append(weakref.proxy(layer))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            wrapped[name] = layer
    return wrapped


def merge_chain(structure: str, method: str, pre_num: int, scaling: float, a: list[torch.Tensor],
                b: list[torch.Tensor], stats: list[dict[str, float]],
                base_weights: list[torch.Tensor] | None = None) -> list[ModuleFactors]:
    """Plain-LoRA factors for every block of one chain (fp32). bs is exact; is/ms use the paper's
    approximations x_{n-1} ≈ α_n x_n with α from saved statistics (input_norm) or weights (weight_norm)."""
    if method not in MERGE_METHODS[structure]:
        raise ValueError(f"merge method {method!r} does not apply to structure {structure!r} "
                         f"(use one of {MERGE_METHODS[structure]})")

    def ratio(num: float, den: float) -> float:
        return num / den if math.isfinite(num) and math.isfinite(den) and den > 0 else 1.0

    merged = []
    for n in range(len(a)):
        m = min(pre_num, n)
        if structure == "bs":  # exact: stack the reused blocks into one LoRA of rank (m+1)·r
            merged.append(ModuleFactors(torch.cat([a[n - k] for k in range(m + 1)]),
                                        scaling * torch.cat([b[n - k] for k in range(m + 1)], dim=1)))
        elif structure == "is":
            if n == 0:
                alpha = 1.0  # x_{-1} := x_0, so the first block's merge 2·s·B_0 A_0 is exact
            elif method == "input_norm":
                alpha = ratio(stats[n - 1]["input_norm"], stats[n]["input_norm"])
            else:  # weight_norm: α_n = f*_{n-2} / f*_{n-1}, f*_k = ‖W_k + s B_k A_k‖_F (on a copy, never in place;
                # where the weight is: a GPU server's, not the host's factors' device)
                norm = lambda k: float((base_weights[k].float() + (scaling * b[k] @ a[k]).to(  # noqa: E731
                    base_weights[k].device)).norm())
                alpha = ratio(norm(n - 2), norm(n - 1)) if n >= 2 else 1.0
            merged.append(ModuleFactors(a[n].clone(), (1 + alpha) * scaling * b[n]))
        elif method == "input_norm":  # ms on activation norms: B*_n = (1 + Σ f_{n-k} / f_n) s B_n
            alpha = sum(ratio(stats[n - k]["shrunk_norm"], stats[n]["shrunk_norm"]) for k in range(1, m + 1))
            merged.append(ModuleFactors(a[n].clone(), (1 + alpha) * scaling * b[n]))
        else:  # ms modified_a: A*_n = A_n + Σ (f_{n-k} / f_n) A_{n-k}, rank r
            shrink = a[n] + sum(ratio(stats[n - k]["input_norm"], stats[n]["input_norm"]) * a[n - k]
                                for k in range(1, m + 1))
            merged.append(ModuleFactors(shrink, scaling * b[n]))
    return merged


@torch.no_grad()
def merge_error(model: nn.Module, layers: dict[str, ResLoraLinear], method: str,
                batches: list[dict[str, torch.Tensor]]) -> float:
    """Relative error ‖logits_merged − logits_unmerged‖ / ‖logits_unmerged‖ over the labelled positions of
    `batches` (eval data), with every chain merged by `method`. The layers are left unmerged."""
    first = next(iter(layers.values()))
    merged: dict[str, ModuleFactors] = {}
    for names in build_chains(list(layers)):
        chain = [layers[n] for n in names]
        weights = [dense_weight(b.base) for b in chain] if method == "weight_norm" else None
        merged.update(zip(names, merge_chain(
            first.structure, method, first.pre_num, first.scaling, [b.lora_A.weight.float() for b in chain],
            [b.lora_B.weight.float() for b in chain], [b.statistics() for b in chain], weights)))

    def logits(batch, use_merged: bool) -> torch.Tensor:
        for name, block in layers.items():
            block.merged = merged[name] if use_merged else None
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out[batch["labels"] != -100].float()

    diff = ref = 0.0
    try:
        for batch in batches:
            unmerged = logits(batch, False)
            diff += float((logits(batch, True) - unmerged).pow(2).sum())
            ref += float(unmerged.pow(2).sum())
    finally:
        for block in layers.values():
            block.merged = None
    return math.sqrt(diff / ref) if ref > 0 else 0.0


"""PEFT AdaLoRA -> canonical form, folded exactly (reference/methods.md §2.9).

Per module with kept rank r_l = sum(mask_l) > 0:  A' = E ⊙ A (row i scaled by lambda_i),
B' = c·B with c = lora_alpha / (init_r + 1e-5) — PEFT keeps `ranknum` at init_r, so c uses init_r,
not the kept rank. Fully pruned modules (saved as empty tensors) are simply not adapted.
"""
from __future__ import annotations

import re
from pathlib import Path

from adapters.canonical import AdapterKind, CanonicalAdapter, ModuleFactors
from adapters.slot_bank import ModuleShape
from loader.peft_files import LoadContext, check_rank, check_shape, group_tensors, read_tensors, require_parts
from server.errors import FailedPrecondition

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[ABE])$")  # Parameters: no `.weight`


def read_adalora(path: Path, adapter_id: str, config: dict, shapes: dict[str, ModuleShape], ctx: LoadContext,
                 load_serial: int) -> CanonicalAdapter:
    if not isinstance(config.get("init_r"), int) or config["init_r"] < 1:
        raise FailedPrecondition(f"adapter {adapter_id!r}: ADALORA config needs a positive integer init_r")
    init_r, alpha = config["init_r"], config.get("lora_alpha", 8)
    if not alpha or alpha <= 0:
        # PEFT falls back to a rank-dependent scale that differs between training and reload; refuse the ambiguity.
        raise FailedPrecondition(f"adapter {adapter_id!r}: ADALORA lora_alpha must be > 0, got {alpha!r}")
    c = alpha / (init_r + 1e-5)
    masks = config.get("rank_pattern") or {}
    parts = group_tensors(read_tensors(path, adapter_id), KEY, adapter_id, "ADALORA", shapes)
    require_parts(parts, config, shapes, adapter_id, {"A": "lora_A", "B": "lora_B", "E": "lora_E"})
    modules = {}
    for module, abe in sorted(parts.items()):
        shape = shapes[module]
        mask = masks.get(f"{module}.lora_E")
        r = sum(bool(m) for m in mask) if mask is not None else init_r
        why = f"rank {r} kept by rank_pattern, base module {shape.d_in}->{shape.d_out}"
        check_shape(adapter_id, f"{module}.lora_A", abe["A"].shape, (r, shape.d_in), why)
        check_shape(adapter_id, f"{module}.lora_B", abe["B"].shape, (shape.d_out, r), why)
        check_shape(adapter_id, f"{module}.lora_E", abe["E"].shape, (r, 1), why)
        if r == 0:
            continue
        check_rank(adapter_id, module, r, ctx)
        a = (abe["E"].float() * abe["A"].float()).contiguous()
        modules[module] = ModuleFactors(a=a, b=(abe["B"].float() * c).contiguous())
    return CanonicalAdapter(adapter_id, AdapterKind.ADALORA, modules, load_serial=load_serial,
                            metadata={"peft_type": "ADALORA", "init_r": init_r, "target_r": config.get("target_r")})

"""PEFT AdaLoRA -> canonical form, folded exactly (reference/methods.md §2.9).

Per module with kept rank r_l = sum(mask_l) > 0:  A' = E ⊙ A (row i scaled by lambda_i),
B' = c·B with c = lora_alpha / (init_r + 1e-5) — PEFT keeps `ranknum` at init_r, so c uses init_r,
not the kept rank. Fully pruned modules (saved as empty tensors) are simply not adapted.
"""
from __future__ import annotations

import re
from pathlib import Path

from adapters.adalora import AdaLoraLinear
from adapters.canonical import AdapterKind, CanonicalAdapter, ModuleFactors
from adapters.layer import stored_transposed
from adapters.slot_bank import ModuleShape
from loader.peft_files import (KEY_PREFIX, PEFT_FORMAT_VERSION, LoadContext, check_rank, check_shape, group_tensors,
                               read_adapter_tensors, require_parts, write_adapter)
from server.errors import FailedPrecondition

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[ABE])$")  # Parameters: no `.weight`


def read_adalora(path: Path, adapter_id: str, config: dict, shapes: dict[str, ModuleShape], ctx: LoadContext,
                 load_serial: int) -> CanonicalAdapter:
    init_r, alpha = config.get("init_r", 12), config.get("lora_alpha", 8)  # PEFT's AdaLoraConfig defaults
    if not isinstance(init_r, int) or init_r < 1:
        raise FailedPrecondition(f"adapter {adapter_id!r}: ADALORA config needs a positive integer init_r")
    if not alpha or alpha <= 0:
        # PEFT falls back to a rank-dependent scale that differs between training and reload; refuse the ambiguity.
        raise FailedPrecondition(f"adapter {adapter_id!r}: ADALORA lora_alpha must be > 0, got {alpha!r}")
    c = alpha / (init_r + 1e-5)
    rename = ctx.layout.renamer()  # its masks name modules as its tensors do: in an older layout, both renamed
    masks = {rename(key): mask for key, mask in sorted((config.get("rank_pattern") or {}).items())}  # in key order,
    # as transformers renames a checkpoint's (some renamings count the keys they have seen)
    parts = group_tensors(read_adapter_tensors(path, adapter_id, shapes, ctx), KEY, adapter_id, "ADALORA", shapes)
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


# PEFT AdaLoraConfig defaults for the schedule keys a caller's config does not set.
ADALORA_DEFAULTS = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                    "orth_reg_weight": 0.5}


def save_adalora(modules: dict[str, AdaLoraLinear], rank_pattern: dict[str, list[bool]] | None, out: Path,
                 config: dict) -> None:
    """Write trained AdaLoraLinear layers (by module path) in PEFT's AdaLoRA layout (reference/methods.md §2.8),
    loadable by `PeftModel.from_pretrained`: `<module>.lora_A|lora_E|lora_B` (no `.weight`) sliced to the triplets
    `rank_pattern` keeps (all init_r when None), fully pruned modules as empty tensors, no `ranknum`.
    `config` carries total_step and the schedule (target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight;
    PEFT defaults otherwise) and may set base_model_name_or_path; init_r, lora_alpha and lora_dropout come from
    the modules."""
    layers = list(modules.values())
    if len({(m.init_r, m.alpha, m.dropout_p) for m in layers}) != 1:
        raise ValueError("AdaLoRA modules of one adapter must share init_r, lora_alpha and lora_dropout")
    derived = {"init_r": layers[0].init_r, "lora_alpha": layers[0].alpha, "lora_dropout": layers[0].dropout_p}
    for key, value in derived.items():
        if key in config and config[key] != value:
            raise ValueError(f"config {key}={config[key]!r} differs from the modules' {value!r}")
    if derived["lora_alpha"] <= 0:
        raise ValueError("AdaLoRA lora_alpha must be > 0: PEFT's fallback scale changes between training and reload")
    if rank_pattern is not None and set(rank_pattern) != {f"{name}.lora_E" for name in modules}:
        raise ValueError("rank_pattern must hold exactly one '<module>.lora_E' mask per AdaLoRA module")
    full = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": 8,
            "target_modules": sorted(modules), "alpha_pattern": {}, "use_rslora": False,
            "fan_in_fan_out": any(stored_transposed(m.base) for m in layers), "bias": "none",
            "modules_to_save": None, "init_lora_weights": True, "use_dora": False, "layers_to_transform": None,
            "peft_version": PEFT_FORMAT_VERSION, **ADALORA_DEFAULTS, **derived, **config,
            "rank_pattern": rank_pattern, "inference_mode": True}
    total = full.get("total_step")
    if not isinstance(total, int) or total <= 0 or not 0 <= full["tinit"] < total - full["tfinal"]:
        raise ValueError(f"PEFT loads AdaLoRA only with total_step > 0 and 0 <= tinit < total_step - tfinal, got "
                         f"total_step={total!r}, tinit={full['tinit']!r}, tfinal={full['tfinal']!r}")
    tensors = {}
    for name, layer in modules.items():
        a, e, b = layer.kept(None if rank_pattern is None else rank_pattern[f"{name}.lora_E"])
        tensors.update({f"{KEY_PREFIX}{name}.lora_A": a, f"{KEY_PREFIX}{name}.lora_E": e,
                        f"{KEY_PREFIX}{name}.lora_B": b})
    write_adapter(out, tensors, full)

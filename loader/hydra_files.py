"""HydraLoRA adapters in the PEFT layout with `peft_type: HYDRALORA` (the format is in the README).

Keys (prefix `base_model.model.`, no adapter name): `<module>.lora_A.weight (r, d_in)`,
`<module>.lora_B.<j>.weight (d_out, r)` for j < lora_nums, `<module>.lora_route.weight (lora_nums, d_in)`
and, with router_bias, `<module>.lora_route.bias (lora_nums,)`. Loading is strict: every key present,
no extra key, shapes checked, head counts consistent.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from adapters.canonical import AdapterKind, CanonicalAdapter, ModuleFactors, lora_scaling
from adapters.hydralora import HydraLoraLinear
from adapters.slot_bank import ModuleShape
from loader.peft_files import (KEY_PREFIX, LoadContext, check_rank, check_shape, group_tensors, write_adapter,
                               read_adapter_tensors, require_parts)
from server.errors import FailedPrecondition

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.\d+\.weight"
                 r"|lora_route\.weight|lora_route\.bias)$")


def save_hydralora(modules: dict[str, HydraLoraLinear], out: Path, config: dict) -> None:
    """Write `modules` (trained HydraLoraLinear layers by module path) and `config` (r, lora_alpha, lora_nums, ...)."""
    tensors = {}
    for name, layer in modules.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        for j, head in enumerate(layer.lora_B):
            tensors[f"{KEY_PREFIX}{name}.lora_B.{j}.weight"] = head.weight
        tensors[f"{KEY_PREFIX}{name}.lora_route.weight"] = layer.lora_route.weight
        if layer.lora_route.bias is not None:
            tensors[f"{KEY_PREFIX}{name}.lora_route.bias"] = layer.lora_route.bias
    full = {"peft_type": "HYDRALORA", "task_type": "CAUSAL_LM", "target_modules": sorted(modules),
            "router_bias": any(m.lora_route.bias is not None for m in modules.values()), **config}
    write_adapter(out, tensors, full)


def read_hydralora(path: Path, adapter_id: str, config: dict, shapes: dict[str, ModuleShape], ctx: LoadContext,
                   load_serial: int) -> CanonicalAdapter:
    for field in ("r", "lora_nums"):
        if not isinstance(config.get(field), int) or config[field] < 1:
            raise FailedPrecondition(f"adapter {adapter_id!r}: HYDRALORA config needs a positive integer {field}")
    r, heads, bias = config["r"], config["lora_nums"], bool(config.get("router_bias", False))
    if heads > ctx.max_heads:
        raise FailedPrecondition(f"adapter {adapter_id!r}: lora_nums {heads} is above the server's "
                                 f"--max-hydra-heads {ctx.max_heads}")
    scale = lora_scaling(float(config.get("lora_alpha", 8)), r, bool(config.get("use_rslora", False)))
    parts = group_tensors(read_adapter_tensors(path, adapter_id, shapes, ctx), KEY, adapter_id, "HYDRALORA", shapes)
    names = {"A": "lora_A.weight", "route": "lora_route.weight", **({"bias": "lora_route.bias"} if bias else {}),
             **{f"B{j}": f"lora_B.{j}.weight" for j in range(heads)}}
    by_suffix = {suffix: part for part, suffix in names.items()}
    for module, have in parts.items():  # rename key suffixes to parts; a head index >= lora_nums is refused
        for suffix in list(have):
            if suffix not in by_suffix:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r}: tensor {KEY_PREFIX}{module}.{suffix} does not fit lora_nums={heads}, "
                    f"router_bias={bias}")
            have[by_suffix[suffix]] = have.pop(suffix)
    require_parts(parts, config, shapes, adapter_id, names)
    modules = {}
    for module, t in sorted(parts.items()):
        shape = shapes[module]
        why = f"r={r}, lora_nums={heads}, base module {shape.d_in}->{shape.d_out}"
        check_shape(adapter_id, f"{module}.lora_A.weight", t["A"].shape, (r, shape.d_in), why)
        check_shape(adapter_id, f"{module}.lora_route.weight", t["route"].shape, (heads, shape.d_in),
                    why + "; the router needs one row per B head")
        if bias:
            check_shape(adapter_id, f"{module}.lora_route.bias", t["bias"].shape, (heads,), why)
        for j in range(heads):
            check_shape(adapter_id, f"{module}.lora_B.{j}.weight", t[f"B{j}"].shape, (shape.d_out, r), why)
        check_rank(adapter_id, module, heads * r, ctx, what="expand width lora_nums·r =")
        b = torch.cat([t[f"B{j}"].float() for j in range(heads)], dim=1) * scale
        modules[module] = ModuleFactors(t["A"].float().contiguous(), b.contiguous(), t["route"].float().contiguous(),
                                        t["bias"].float().contiguous() if bias else None)
    return CanonicalAdapter(adapter_id, AdapterKind.HYDRALORA, modules, load_serial=load_serial,
                            metadata={"peft_type": "HYDRALORA", "heads": heads})

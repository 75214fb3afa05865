"""ResLoRA adapters (`peft_type: RESLORA`): raw factors in the PEFT LoRA key layout, plus the chain
topology and training statistics in the config; merged into plain LoRA when loaded (never served
with residual paths). Config keys: r, lora_alpha, lora_dropout, target_modules, structure (is|bs|ms),
pre_num, chains (ordered module paths), merge_method, statistics {module: {input_norm, shrunk_norm}},
stats_window, and optionally merge_error {method: relative error measured on eval data}.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NoReturn

from adapters.canonical import AdapterKind, CanonicalAdapter
from adapters.reslora import MERGE_METHODS, ResLoraLinear, build_chains, chain_position, merge_chain
from adapters.slot_bank import ModuleShape
from loader.lora_files import KEY
from loader.peft_files import (KEY_PREFIX, LoadContext, check_rank, check_shape, group_tensors, read_adapter_tensors,
                               require_parts, write_adapter)
from server.errors import FailedPrecondition

DEFAULT_MERGE = {"bs": "exact", "is": "input_norm", "ms": "input_norm"}


def save_reslora(modules: dict[str, ResLoraLinear], out: Path, config: dict) -> None:
    """Write trained ResLoraLinear layers (by module path) with their topology and statistics."""
    tensors = {}
    for name, layer in modules.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    first = next(iter(modules.values()))
    full = {"peft_type": "RESLORA", "task_type": "CAUSAL_LM", "target_modules": sorted(modules),
            "structure": first.structure, "pre_num": first.pre_num, "chains": build_chains(list(modules)),
            "merge_method": DEFAULT_MERGE[first.structure], "stats_window": first.input_norms.maxlen,
            "statistics": {name: layer.statistics() for name, layer in modules.items()}, **config}
    write_adapter(out, tensors, full)


def check_chains(chains: list[list[str]], modules: set[str], refuse: Callable[[str], NoReturn]) -> None:
    """The chains the trainer linked (adapters.reslora.build_chains): each module once, one chain per module type
    holding every adapted block of that type, in depth order. The merge adds each block's predecessors in its
    chain, so any other grouping or order loads fine and computes something that was never trained."""
    seen: set[str] = set()
    for module in (m for chain in chains for m in chain):
        if module in seen:
            refuse(f"module {module!r} appears more than once in 'chains'")
        seen.add(module)
    if seen != modules:
        refuse(f"'chains' and the tensors disagree on modules {sorted(seen ^ modules)[:3]} (every adapted module "
               f"belongs to exactly one chain)")
    owner: dict[str, int] = {}  # module type -> the chain that links it
    for i, chain in enumerate(chains):
        try:
            positions = [chain_position(m) for m in chain]
        except ValueError as exc:
            refuse(f"'chains': {exc}")
        kinds = sorted({kind for kind, _ in positions})
        if len(kinds) > 1:
            refuse(f"'chains'[{i}] mixes module types {kinds[0]!r} and {kinds[1]!r}; a chain links one module type "
                   f"across depth")
        depths = [depth for _, depth in positions]
        if depths != sorted(depths):
            later = next(n for n in range(1, len(depths)) if depths[n] < depths[n - 1])
            refuse(f"'chains'[{i}] ({kinds[0]}) is not in depth order: layer {depths[later]} comes after layer "
                   f"{depths[later - 1]}")
        if kinds[0] in owner:
            refuse(f"module type {kinds[0]!r} is split across 'chains'[{owner[kinds[0]]}] and [{i}]; one chain per "
                   f"module type links all its blocks")
        owner[kinds[0]] = i


def read_reslora(path: Path, adapter_id: str, config: dict, shapes: dict[str, ModuleShape], ctx: LoadContext,
                 load_serial: int) -> CanonicalAdapter:
    def refuse(why: str) -> NoReturn:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {why}")
    structure, method = config.get("structure"), config.get("merge_method")
    if not isinstance(structure, str) or structure not in MERGE_METHODS:
        refuse(f"RESLORA structure must be one of {sorted(MERGE_METHODS)}, got {structure!r}")
    method = DEFAULT_MERGE[structure] if method is None else method
    if not isinstance(method, str) or method not in MERGE_METHODS[structure]:
        refuse(f"merge_method {method!r} does not apply to structure {structure!r} (use {MERGE_METHODS[structure]})")
    r, pre_num, chains = config.get("r"), config.get("pre_num", 0), config.get("chains")
    if not isinstance(r, int) or r < 1 or not isinstance(pre_num, int) or pre_num < 0:
        refuse("RESLORA config needs a positive integer r and a non-negative integer pre_num")
    if not isinstance(chains, list) or not all(isinstance(c, list) and c and all(isinstance(m, str) for m in c)
                                               for c in chains):
        refuse("RESLORA config needs 'chains': a list of non-empty lists of module paths (strings)")
    stats = config.get("statistics") or {}
    if not isinstance(stats, dict):
        refuse(f"RESLORA statistics must be an object {{module: {{input_norm, shrunk_norm}}}}, got {stats!r:.100}")
    for module, values in stats.items():
        if not isinstance(values, dict):
            refuse(f"statistics[{module!r}] must be an object {{input_norm, shrunk_norm}}, got {values!r:.100}")
    parts = group_tensors(read_adapter_tensors(path, adapter_id, shapes, ctx), KEY, adapter_id, "RESLORA", shapes)
    require_parts(parts, config, shapes, adapter_id, {"A": "lora_A.weight", "B": "lora_B.weight"})
    check_chains(chains, set(parts), refuse)
    chained = [m for chain in chains for m in chain]
    for module, ab in parts.items():
        shape = shapes[module]
        why = f"rank {r} from the config, base module {shape.d_in}->{shape.d_out}"
        check_shape(adapter_id, f"{module}.lora_A.weight", ab["A"].shape, (r, shape.d_in), why)
        check_shape(adapter_id, f"{module}.lora_B.weight", ab["B"].shape, (shape.d_out, r), why)
    if method in ("input_norm", "modified_a"):
        for module in chained:
            values = stats.get(module, {})
            if not all(isinstance(values.get(k), (int, float)) and math.isfinite(values[k]) and values[k] > 0
                       for k in ("input_norm", "shrunk_norm")):
                refuse(f"statistics for {module!r} are missing or not positive; the {method} merge needs the "
                       f"training statistics (retrain, or choose merge_method weight_norm/exact where it applies)")
    if method == "weight_norm" and ctx.base_weight is None:
        refuse("the weight_norm merge needs the base weights, which this loader was not given")

    for chain in chains:  # before merging: a bs merge's factors grow with pre_num (the reused blocks stacked)
        for n, module in enumerate(chain):
            check_rank(adapter_id, module, (min(pre_num, n) + 1) * r if structure == "bs" else r, ctx,
                       what="merged rank")
    scaling = float(config.get("lora_alpha", 8)) / r
    modules = {}
    for chain in chains:
        weights = [ctx.base_weight(m) for m in chain] if method == "weight_norm" else None
        merged = merge_chain(structure, method, pre_num, scaling, [parts[m]["A"].float() for m in chain],
                             [parts[m]["B"].float() for m in chain], [stats.get(m, {}) for m in chain], weights)
        modules.update(zip(chain, merged))
    error = (config.get("merge_error") or {}).get(method)
    return CanonicalAdapter(adapter_id, AdapterKind.RESLORA, modules, load_serial=load_serial,
                            metadata={"peft_type": "RESLORA", "structure": structure, "pre_num": pre_num,
                                      "merge_method": method, "merge_error": 0.0 if method == "exact" else error})

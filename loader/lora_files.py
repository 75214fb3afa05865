"""PEFT LoRA -> canonical form: A as is, B scaled by alpha/r (or alpha/sqrt(r)), per-module patterns resolved."""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from adapters.canonical import AdapterKind, CanonicalAdapter, ModuleFactors, lora_scaling, resolve_pattern
from adapters.layer import stored_transposed
from adapters.slot_bank import ModuleShape
from loader.peft_files import (KEY_PREFIX, PEFT_FORMAT_VERSION, LoadContext, check_rank, check_shape, group_tensors,
                               read_adapter_tensors, require_parts, write_adapter)

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
log = logging.getLogger("loraplex.adapters")


def read_lora(path: Path, adapter_id: str, config: dict, shapes: dict[str, ModuleShape], ctx: LoadContext,
              load_serial: int) -> CanonicalAdapter:
    parts = group_tensors(read_adapter_tensors(path, adapter_id, shapes, ctx), KEY, adapter_id, "LORA", shapes)
    require_parts(parts, config, shapes, adapter_id, {"A": "lora_A.weight", "B": "lora_B.weight"})
    r_default, alpha_default = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rebuilt = rebuilt_init(config)
    if rebuilt is not None:
        if ctx.base_weight is None:
            raise ValueError(f"adapter {adapter_id!r}: its {rebuilt} residual needs the base weights (LoadContext)")
        log.info("adapter %r: init_lora_weights %r: its residual base is rebuilt from --model's weights, as PEFT's "
                 "load does (if --model is the residual model saved with it, set init_lora_weights to true)",
                 adapter_id, config["init_lora_weights"])
    modules = {}
    for module, ab in sorted(parts.items()):
        shape = shapes[module]
        r = int(resolve_pattern(config.get("rank_pattern"), module, r_default))
        alpha = float(resolve_pattern(config.get("alpha_pattern"), module, alpha_default, "alpha_pattern"))
        why = f"rank {r} from the config, base module {shape.d_in}->{shape.d_out}"
        check_shape(adapter_id, f"{module}.lora_A.weight", ab["A"].shape, (r, shape.d_in), why)
        check_shape(adapter_id, f"{module}.lora_B.weight", ab["B"].shape, (shape.d_out, r), why)
        scale = lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
        a, b = ab["A"].float(), ab["B"].float() * scale
        if rebuilt is not None:
            check_rank(adapter_id, module, 2 * r, ctx, f"rank {r} + {r} (its {rebuilt} residual base, served as a "
                                                         f"second term on the base weights)")
            # the weight's layout as the module stores it, not the config's fan_in_fan_out: PEFT sets that from the
            # module's type when it loads the adapter (a hand-edited config may say otherwise)
            variant = (rebuilt, r, scale, shape.stored_transposed)
            compute = lambda: residual_term(rebuilt, ctx.base_weight(module), *variant[1:])  # noqa: E731
            extra_a, extra_b = compute() if ctx.residuals is None else ctx.residuals.get(variant, module, compute)
            a, b = torch.cat([a, extra_a]), torch.cat([b, extra_b], dim=1)
        else:
            check_rank(adapter_id, module, r, ctx)
        modules[module] = ModuleFactors(a=a.contiguous(), b=b.contiguous())
    return CanonicalAdapter(adapter_id, AdapterKind.LORA, modules, load_serial=load_serial,
                            metadata={"peft_type": "LORA"})


def rebuilt_init(config: dict) -> str | None:
    """'pissa' or 'olora' where the adapter was trained on a residual base that PEFT rebuilds from the original
    weights whenever it loads the adapter (as PEFT tells them: pissa, pissa_niter_N, olora in any case)."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith("pissa"):
        return "pissa"
    if isinstance(init, str) and init.lower() == "olora":
        return "olora"
    return None


def residual_term(init: str, weight: torch.Tensor, r: int, scale: float,
                  stored_transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), canonical: the rank-r part that PEFT's init took out of `weight` (fp32, (d_out, d_in)) when it made
    the residual base the adapter was trained on, negated, so that base + this + the adapter is what PEFT serves.
    PiSSA's part is the top r singular triplets: exact for 'pissa'; 'pissa_niter_N' took a randomized estimate of
    them, different at each of PEFT's loads too, and the exact ones are the closest any load gets. OLoRA's part is
    scale * Q[:, :r] R[:r] of the QR decomposition of the weight as the module stores it (PEFT does not transpose a
    Conv1D's (d_in, d_out) weight there: `stored_transposed`). Runs on the weight's device (on a GPU: transient memory
    of about three fp32 copies of it)."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        a, b = vh[:r], -(u[:, :r] * s[:r])
    elif stored_transposed:
        q, upper = torch.linalg.qr(weight.t())  # stored - scale * Q_r R_r, transposed back
        a, b = q[:, :r].t(), -scale * upper[:r].t()
    else:
        q, upper = torch.linalg.qr(weight)
        a, b = upper[:r], -scale * q[:, :r]
    return a.float().cpu(), b.float().cpu()  # the weight may live on the GPU; factors are kept on the host


class ResidualCache:
    """The residual terms of the PiSSA/OLoRA adapters read last, by settings (init, rank, scale, layout): reading one
    again (after an eviction) or another with the same settings takes no SVD or QR. Holds the terms of at most
    `variants` settings, each as large as an adapter of that rank; reads on several threads share it."""

    def __init__(self, variants: int = 4) -> None:
        self._variants = variants
        self._terms: OrderedDict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, variant: tuple, module: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            found = self._terms.get(variant, {}).get(module)
        if found is None:
            found = compute()  # outside the lock: an SVD takes seconds (two reads may both compute one)
        with self._lock:
            self._terms.setdefault(variant, {})[module] = found
            self._terms.move_to_end(variant)
            while len(self._terms) > self._variants:
                self._terms.popitem(last=False)
        return found


def save_lora(modules: dict, out: Path, config: dict) -> None:
    """Write trained LoraLinear layers (by module path) in PEFT's LoRA layout, loadable by
    `PeftModel.from_pretrained`. `config` carries r, lora_alpha, lora_dropout, use_rslora, base_model_name_or_path."""
    tensors = {}
    for name, layer in modules.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    conv1d = any(stored_transposed(layer.base) for layer in modules.values())
    full = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": 8, "lora_alpha": 8,
            "lora_dropout": 0.0, "target_modules": sorted(modules), "rank_pattern": {}, "alpha_pattern": {},
            "use_rslora": False, "fan_in_fan_out": conv1d, "bias": "none", "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "use_dora": False, "layers_to_transform": None,
            "peft_version": PEFT_FORMAT_VERSION, **config}
    write_adapter(out, tensors, full)


def save_canonical_as_lora(adapter, out: Path, extra: dict | None = None) -> None:
    """A router-less canonical adapter as a PEFT LoRA directory: per-module ranks in rank_pattern and
    alpha_pattern = rank, so PEFT's scaling is 1 and the folded B is used as is."""
    tensors, ranks = {}, {}
    for name, f in adapter.modules.items():
        if f.router is not None:
            raise ValueError(f"module {name} has a router; a HydraLoRA adapter has no plain-LoRA form")
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = f.a
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = f.b
        ranks[name] = f.rank
    r = max(ranks.values())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": r,
              "lora_alpha": r, "lora_dropout": 0.0, "target_modules": sorted(ranks),
              "rank_pattern": {k: v for k, v in ranks.items() if v != r},
              "alpha_pattern": {k: v for k, v in ranks.items() if v != r}, "use_rslora": False,
              "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True, "use_dora": False, "layers_to_transform": None,
              "peft_version": PEFT_FORMAT_VERSION, **(extra or {})}
    write_adapter(out, tensors, config)

"""Read adapter directories in the PEFT layout into the canonical form, refusing what we cannot serve exactly."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.canonical import AdapterKind, CanonicalAdapter, ModuleFactors, lora_scaling, resolve_pattern
from adapters.slot_bank import ModuleShape
from server.errors import FailedPrecondition

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def read_config(path: Path, adapter_id: str) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG_FILE} must be an object with a 'peft_type'")
    return config


def read_tensors(path: Path, adapter_id: str) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).exists():
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: pickle weights ({PICKLE_FILE}) are refused because loading them can run "
                f"code; convert to safetensors, e.g. PeftModel.from_pretrained(...).save_pretrained(dir) or "
                f"safetensors.torch.save_file(torch.load(f, weights_only=True), '{WEIGHTS_FILE}', {{'format': 'pt'}})")
        raise FailedPrecondition(f"adapter {adapter_id!r}: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FailedPrecondition(f"adapter {adapter_id!r}: cannot read {WEIGHTS_FILE}: {exc}") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise FailedPrecondition(f"adapter {adapter_id!r}: tensor {key} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise FailedPrecondition(f"adapter {adapter_id!r}: tensor {key} contains NaN or Inf")
    return tensors


def _targets(config: dict, module: str) -> bool:
    """PEFT's target rule: a string is a full-match regex, a list matches by name or dotted suffix."""
    def matches(spec) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, module) is not None
        return any(module == t or module.endswith("." + t) for t in spec)
    return matches(config.get("target_modules")) and not matches(config.get("exclude_modules"))


def _refuse_unservable(config: dict, adapter_id: str) -> None:
    checks = [
        (config.get("use_dora"), "use_dora is true (DoRA is not served)"),
        (config.get("modules_to_save"), "modules_to_save is set (full module copies cannot share a batch)"),
        (config.get("trainable_token_indices"), "trainable_token_indices is set"),
        (config.get("target_parameters"), "target_parameters is set"),
        (config.get("bias", "none") != "none", f"bias is {config.get('bias')!r}; only 'none' is served"),
        (config.get("lora_bias"), "lora_bias is true"),
        (config.get("layers_to_transform") is not None, "layers_to_transform is set; list modules in target_modules"),
        (config.get("layer_replication"), "layer_replication is set"),
    ]
    for bad, why in checks:
        if bad:
            raise FailedPrecondition(f"adapter {adapter_id!r}: {why}")


def read_lora(path: Path, adapter_id: str, config: dict, shapes: dict[str, ModuleShape], max_rank: int,
              load_serial: int) -> CanonicalAdapter:
    _refuse_unservable(config, adapter_id)
    tensors = read_tensors(path, adapter_id)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise FailedPrecondition(f"adapter {adapter_id!r}: unsupported tensor {key} in a LORA adapter")
        module = m["module"]
        if module not in shapes:
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: tensor {key} targets module {module!r}, which this base model does not "
                f"have or the server does not adapt (see --target-modules)")
        parts.setdefault(module, {})[m["part"]] = t
    for module in shapes:
        if _targets(config, module) and module not in parts:
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: target module {module!r} has no weights (missing key "
                f"{KEY_PREFIX}{module}.lora_A.weight)")
    if not parts:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {WEIGHTS_FILE} holds no LoRA tensors")

    r_default, alpha_default = int(config.get("r", 8)), config.get("lora_alpha", 8)
    modules = {}
    for module, ab in sorted(parts.items()):
        for part in "AB":
            if part not in ab:
                raise FailedPrecondition(f"adapter {adapter_id!r}: missing key {KEY_PREFIX}{module}.lora_{part}.weight")
        shape = shapes[module]
        r = int(resolve_pattern(config.get("rank_pattern"), module, r_default))
        alpha = float(resolve_pattern(config.get("alpha_pattern"), module, alpha_default))
        for part, got, want in (("A", ab["A"].shape, (r, shape.d_in)), ("B", ab["B"].shape, (shape.d_out, r))):
            if tuple(got) != want:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r}: {KEY_PREFIX}{module}.lora_{part}.weight has shape {tuple(got)}, "
                    f"expected {want} (rank {r} from the config, base module {shape.d_in}->{shape.d_out})")
        if r > max_rank:
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: module {module!r} has rank {r}, above the server's --max-lora-rank {max_rank}")
        scale = lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
        modules[module] = ModuleFactors(a=ab["A"].float().contiguous(), b=(ab["B"].float() * scale).contiguous())
    return CanonicalAdapter(adapter_id, AdapterKind.LORA, modules, load_serial=load_serial,
                            metadata={"peft_type": "LORA"})


def read_adapter(path: Path, adapter_id: str, shapes: dict[str, ModuleShape], max_rank: int,
                 load_serial: int) -> CanonicalAdapter:
    config = read_config(path, adapter_id)
    peft_type = config["peft_type"]
    if peft_type == "LORA":
        return read_lora(path, adapter_id, config, shapes, max_rank, load_serial)
    raise FailedPrecondition(f"adapter {adapter_id!r}: peft_type {peft_type!r} is not served (supported: LORA)")

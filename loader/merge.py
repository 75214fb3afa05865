"""`loraplex merge`: a ResLoRA adapter -> a plain PEFT LoRA directory (any LoRA server can load it), with the
merge error measured on eval data (unmerged vs merged logits)."""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from safetensors.torch import load_file

from adapters.reslora import add_reslora, build_chains, merge_error
from loader.inject import base_weight
from loader.lora_files import save_canonical_as_lora
from loader.peft_files import CONFIG_FILE, WEIGHTS_FILE, read_adapter, read_config
from loader.train_data import collate, read_jsonl
from loader.train_job_spec import CHECKPOINT, LOG, JobError, TrainJob
from loader.training_job import _load, padding_id


def _check_out(adapter_dir: Path, out: Path, overwrite: bool) -> None:
    """--out is no adapter this merge would silently replace: never the one merged (its factors, chains and
    statistics could not be made again), another only with `overwrite` (checked before the model loads)."""
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} is a file, not a directory")
    if out.resolve() == adapter_dir.resolve():
        raise JobError(f"--out {out} is the ResLoRA adapter being merged, whose factors, chains and statistics "
                       f"the merge would replace: write it to another directory")
    held = [name for name in (CONFIG_FILE, WEIGHTS_FILE, LOG, CHECKPOINT) if (out / name).exists()]
    if held and not overwrite:
        raise JobError(f"--out {out} already holds {', '.join(held)}; pass --overwrite to replace that adapter")


def merge_reslora(adapter_dir: Path, out: Path, model: str = "default", eval_path: str | None = None,
                  method: str | None = None, max_length: int = 256, device: str = "cpu",
                  overwrite: bool = False) -> dict:
    config = read_config(adapter_dir, adapter_dir.name)
    if config.get("peft_type") != "RESLORA":
        raise JobError(f"{adapter_dir}: peft_type is {config.get('peft_type')!r}; only RESLORA adapters merge")
    method = method or config.get("merge_method")
    _check_out(adapter_dir, out, overwrite)
    _, base, tokenizer = _load(TrainJob(method="reslora", data="", out=str(out), model=model, device=device))
    modules = {name: None for chain in config["chains"] for name in chain}
    from adapters.layer import module_shape
    try:
        shapes = {name: module_shape(name, base.get_submodule(name)) for name in modules}
    except (AttributeError, TypeError) as exc:  # no such module, or one that is no linear layer
        raise JobError(f"--model {model}: {exc}; the adapter adapts {next(iter(modules))}, ... (trained on a "
                       f"model of another architecture?)") from None
    conv1d = any(s.stored_transposed for s in shapes.values())  # as save_lora says it
    merged = read_adapter(adapter_dir, adapter_dir.name, shapes, max_rank=1 << 20, load_serial=0,
                          base_weight=lambda name: base_weight(base, name),  # the server's validated merge
                          config=dict(config, merge_method=method))
    error = None
    if eval_path:
        layers = add_reslora(base, sorted(modules), config["r"], config["lora_alpha"], 0.0, config["structure"],
                             config["pre_num"])
        if build_chains(sorted(layers)) != config["chains"]:
            raise JobError(f"{adapter_dir}: the saved chains do not match this model's module order")
        tensors = load_file(adapter_dir / WEIGHTS_FILE)
        for name, layer in layers.items():
            layer.lora_A.weight.data.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.weight.data.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
            stats = config["statistics"].get(name, {})
            layer.input_norms = deque([stats.get("input_norm", float("nan"))])
            layer.shrunk_norms = deque([stats.get("shrunk_norm", float("nan"))])
        base.to(device)  # the new adapter layers were made on the CPU, as in training
        pad = padding_id(tokenizer, base)
        examples = read_jsonl(Path(eval_path), tokenizer, max_length, base.config.get_text_config().vocab_size)
        batches = [{k: v.to(device) for k, v in collate(examples[i:i + 8], pad).items()}
                   for i in range(0, len(examples), 8)]
        error = merge_error(base.eval(), layers, method, batches)
    # A training run's files there describe the replaced adapter (a `train --resume` would pass the merge as its
    # finished job): gone before the merge is written, so a crash in between leaves no merge beside them.
    for name in (LOG, CHECKPOINT):
        (out / name).unlink(missing_ok=True)
    save_canonical_as_lora(merged, out, {"base_model_name_or_path": config.get("base_model_name_or_path"),
                                         "fan_in_fan_out": conv1d})
    report = {"structure": config["structure"], "merge_method": method, "merge_error": error,
              "recorded_merge_error": (config.get("merge_error") or {}).get(method), "out": str(out)}
    (out / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report


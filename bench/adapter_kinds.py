"""Cost of the extra adapter kinds (issue 4): decode throughput of 32 rows through the real server, each
configuration relative to the base model, measured side by side in interleaved rounds:
  (a) LoRA r=32                      (32 distinct adapters)
  (b) HydraLoRA K=4, r=8             (32 distinct; same expand width 32 as (a), router per token)
  (c) AdaLoRA, per-layer ranks averaging 16 (32 distinct; PEFT ADALORA layout with rank_pattern masks)
  (d) an even mix: 8 LoRA + 8 AdaLoRA + 8 HydraLoRA + 8 ResLoRA (bs, pre_num 1, merged at load)
Targets: Hydra time <= 1.15 x LoRA time at equal effective rank (a/b <= 1.15); mix >= 0.75 x base.
Each server variant (--variants: adapter kernel / factor dtype) runs in its own server process; every round
runs every configuration on every variant, so all ratios are measured side by side.

    .venv/bin/python bench/adapter_kinds.py [--device cuda] [--repeats 5]

Same model, prompts, server process and reporting conventions as bench/mixed_adapters.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from adapters.hydralora import add_hydralora  # noqa: E402
from adapters.reslora import add_reslora  # noqa: E402
from loader.hydra_files import save_hydralora  # noqa: E402
from loader.reslora_files import save_reslora  # noqa: E402
from mixed_adapters import (TARGETS, EngineBench, add_common_arguments, build_model_dir, code_version,  # noqa: E402
                            machine, make_prompts)

PER_KIND = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--variants", default=None,
                   help="comma-separated server variants KERNEL/FACTOR_DTYPE (--adapter-kernel / --adapter-dtype); "
                        "default: torch/float32 and native/{float32,bfloat16,float16} where the native kernel runs, "
                        "else torch/auto; a variant may add server environment after @, e.g. "
                        "native/float32@GOMP_SPINCOUNT=300 (several: @A=1@B=2)")
    args = p.parse_args(argv)
    if args.variants is None:  # the native kernel's variants where it runs (CPU with AVX-512 or AVX2)
        from adapters import cpu_kernel
        native = args.device == "cpu" and cpu_kernel.available() is None
        args.variants = "torch/float32,native/float32,native/bfloat16,native/float16" if native else "torch/auto"
    args.rank = 32              # slot width: LoRA r=32, Hydra 4x8, AdaLoRA up to 32, ResLoRA bs 2x16
    args.adapters = 4 * PER_KIND  # every adapter keeps its slot: no slot writes inside a timed round
    return args


def build_lora(model_dir: Path, root: Path, names: list[str], r: int, seed: int) -> None:
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.save_pretrained(root)


def build_hydra(model_dir: Path, root: Path, names: list[str], seed: int) -> None:
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        layers = add_hydralora(model, TARGETS, r=8, alpha=16, heads=4)
        with torch.no_grad():
            for layer in layers.values():
                for head in layer.lora_B:
                    head.weight.normal_(0, 0.02)
        save_hydralora(layers, root / name, {"r": 8, "lora_alpha": 16, "lora_nums": 4})


def build_adalora(model_dir: Path, root: Path, names: list[str], seed: int, init_r: int = 32) -> None:
    """PEFT's saved AdaLoRA layout, as after masking: kept ranks 8..24 per module (mean 16), tensors sliced."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    modules = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    g = torch.Generator().manual_seed(seed)
    for name in names:
        tensors, pattern = {}, {}
        for path, module in modules:
            kept = int(torch.randint(8, 25, (1,), generator=g))
            mask = torch.zeros(init_r, dtype=torch.bool)
            mask[torch.randperm(init_r, generator=g)[:kept]] = True
            pattern[f"{path}.lora_E"] = mask.tolist()
            key = f"base_model.model.{path}"
            tensors[f"{key}.lora_A"] = torch.randn(kept, module.in_features, generator=g) * 0.02
            tensors[f"{key}.lora_B"] = torch.randn(module.out_features, kept, generator=g) * 0.02
            tensors[f"{key}.lora_E"] = torch.randn(kept, 1, generator=g)
        (root / name).mkdir(parents=True)
        save_file(tensors, str(root / name / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": init_r, "target_r": 16, "r": 8,
                  "lora_alpha": 32, "target_modules": TARGETS, "rank_pattern": pattern, "bias": "none"}
        (root / name / "adapter_config.json").write_text(json.dumps(config))


def build_reslora(model_dir: Path, root: Path, names: list[str], seed: int) -> None:
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        layers = add_reslora(model, TARGETS, r=16, alpha=32, dropout=0.0, structure="bs", pre_num=1)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.weight.normal_(0, 0.02)
        save_reslora(layers, root / name, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0})


def main(argv=None) -> int:
    args = parse_args(argv)
    args.code = code_version()
    torch.set_num_threads(args.threads)
    command = "cd " + shlex.quote(os.getcwd()) + " && " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    prompts = make_prompts(args)
    new = args.max_new_tokens
    kinds = {k: [f"{k}{i:02d}" for i in range(PER_KIND)] for k in ("lora", "hydra", "adalora", "reslora")}
    with tempfile.TemporaryDirectory(prefix="loraplex-kinds-", dir=args.workdir) as tmp:
        model_dir, root = Path(tmp) / "model", Path(tmp) / "adapters"
        t0 = time.perf_counter()
        build_model_dir(model_dir, args)
        build_lora(model_dir, root, kinds["lora"], 32, args.seed)
        build_hydra(model_dir, root, kinds["hydra"], args.seed + 100)
        build_adalora(model_dir, root, kinds["adalora"], args.seed + 200)
        build_reslora(model_dir, root, kinds["reslora"], args.seed + 300)
        print(f"built model + {sum(map(len, kinds.values()))} adapters in {time.perf_counter() - t0:.0f}s", flush=True)
        mix = [kinds[k][i // 4] for i, k in zip(range(args.requests),
                                                 ["lora", "adalora", "hydra", "reslora"] * args.requests)]
        configs = {
            "base": ("base model", [""] * args.requests),
            "a": ("LoRA r=32", kinds["lora"][:args.requests]),
            "b": ("HydraLoRA K=4 r=8", kinds["hydra"][:args.requests]),
            "c": ("AdaLoRA ranks 8-24 (mean 16)", kinds["adalora"][:args.requests]),
            "d": ("mix: LoRA+AdaLoRA+Hydra+ResLoRA", mix),
        }
        variants = args.variants.split(",")
        results: dict[tuple, list[float]] = {(v, k): [] for v in variants for k in configs}
        engines = {}
        try:  # (a server that failed to start leaves none of those started before it running)
            for v in variants:
                engines[v] = EngineBench(model_dir, root, [n for names in kinds.values() for n in names], args,
                                         *v.split("@")[0].split("/"),
                                         env=dict(kv.split("=", 1) for kv in v.split("@")[1:]))
            for rnd in range(args.repeats + 1):
                for v, engine in engines.items():
                    for key, (label, ids) in configs.items():
                        wall, tokens, _ = engine.round(prompts, ids, new)
                        assert sum(map(len, tokens)) == len(prompts) * new
                        print(f"  {'warm-up' if rnd == 0 else f'round {rnd}':8s} {v:16s} ({key}) "
                              f"{label:34s} {len(prompts) * new / wall:8.1f} tok/s", flush=True)
                        if rnd:
                            results[v, key].append(len(prompts) * new / wall)
        finally:
            for engine in engines.values():
                engine.close()
    median = {k: statistics.median(v) for k, v in results.items()}
    lines = [f"adapter_kinds: {args.requests} rows x {new} new tokens, prompts {args.prompt_min}-{args.prompt_max} "
             f"tokens; same model as mixed_adapters ({args.device}, fp32); all seven projections adapted; "
             f"median of {args.repeats} interleaved runs; server variants (--adapter-kernel/--adapter-dtype) "
             f"{', '.join(variants)}",
             f"command: {command}", f"machine: {machine(args)}", f"code: {args.code}", "",
             "| config | " + " | ".join(f"{v} tok/s | vs base" for v in variants) + " |",
             "|---|" + "---:|---:|" * len(variants)]
    for key, (label, _) in configs.items():
        cells = [f"{median[v, key]:.1f} | {median[v, key] / median[v, 'base']:.3f}" for v in variants]
        lines.append(f"| ({key}) {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in variants:
        hydra_cost, mix = median[v, "a"] / median[v, "b"], median[v, "d"] / median[v, "base"]
        lines.append(f"{v}: Hydra time / LoRA time (equal width 32) = {hydra_cost:.3f} "
                     f"(target <= 1.15: {'met' if hydra_cost <= 1.15 else 'NOT met'}); mix / base = {mix:.3f} "
                     f"(target >= 0.75: {'met' if mix >= 0.75 else 'NOT met'})")
    print("\n" + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

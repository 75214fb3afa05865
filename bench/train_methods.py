"""Training benchmark (issue 3): the four methods on the same data, same steps, same seed.

A small random Llama (fixed seed) learns a synthetic multi-task string corpus (reverse / upper / double
of short words, `<task>: <word> => <answer>`, loss on the answer). Reported per method: final eval loss,
trainable parameters, wall time. Methods are configured to comparable budgets: LoRA r=8; AdaLoRA
init_r=12 -> target_r=8 (same final rank budget); HydraLoRA K=3 heads r=4; ResLoRA r=8 for each of
is/bs/ms (pre_num 1). All adapt q/v/down projections.

    .venv/bin/python bench/train_methods.py [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.training import TrainSettings  # noqa: E402
from loader.default_model import build_model_dir  # noqa: E402
from loader.train_job_spec import TrainJob  # noqa: E402
from loader.training_job import run_job  # noqa: E402

TASKS = {"reverse": lambda s: s[::-1], "upper": str.upper, "double": lambda s: s + s}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def write_corpus(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            task = rng.choice(sorted(TASKS))
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
            f.write(json.dumps({"prompt": f"{task}: {word} =>", "completion": f" {TASKS[task](word)}"}) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    configs = {
        "lora r=8": dict(method="lora", rank=8, alpha=16),
        "adalora 12->8": dict(method="adalora", init_r=12, target_r=8, alpha=16,
                              tinit=args.steps // 10, tfinal=args.steps // 5),
        "hydralora K=3 r=4": dict(method="hydralora", rank=4, alpha=8, heads=3),
        "reslora is r=8": dict(method="reslora", rank=8, alpha=16, structure="is"),
        "reslora bs r=8": dict(method="reslora", rank=8, alpha=16, structure="bs"),
        "reslora ms r=8": dict(method="reslora", rank=8, alpha=16, structure="ms"),
    }
    settings = TrainSettings(lr=5e-3, max_steps=args.steps, batch_size=16, eval_every=max(1, args.steps // 3),
                             seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loraplex-train-") as tmp:
        tmp = Path(tmp)
        model = build_model_dir(tmp / "model", "llama", seed=args.seed, hidden_size=128, intermediate_size=352,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
        train, evaluation = write_corpus(tmp / "train.jsonl", 2000, 1), write_corpus(tmp / "eval.jsonl", 200, 2)
        for label, extra in configs.items():
            job = TrainJob(data=str(train), eval=str(evaluation), out=str(tmp / label.replace(" ", "_")),
                           model=str(model), target_modules=TARGETS, settings=replace(settings), **extra)
            s = run_job(job)
            rows.append((label, s["eval_loss"][0][1], s["eval_loss"][-1][1], s["trainable_params"], s["seconds"],
                         s.get("merge_error")))
    print(f"\ntrain_methods: {args.steps} steps, batch 16, lr 5e-3 (warmup + cosine), seed {args.seed}; "
          f"Llama hidden 128, "
          f"4 layers, byte tokenizer, random init; 2000 train / 200 eval examples of reverse/upper/double; "
          f"targets {','.join(TARGETS)}\n")
    print(f"| method | eval loss @{args.steps // 3} | final eval loss | trainable params | seconds | merge error |")
    print("|---|---:|---:|---:|---:|---|")
    for label, first, last, params, seconds, errors in rows:
        merge = ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) if errors else "-"
        print(f"| {label} | {first:.4f} | {last:.4f} | {params} | {seconds:.1f} | {merge} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

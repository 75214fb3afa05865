"""`loraplex build-default`: pretrain the built-in base model on BASE_TASKS, train one demo adapter per kind on
tasks the base never saw (with `loraplex train`'s own job runner), and measure exact match on held-out
words through the serving stack (slot bank + Runner, as the server runs them). Deterministic for a seed."""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from adapters.slot_bank import SlotBank
from adapters.training import Trainer, TrainSettings
from loader.base_model import load_base_model
from loader.builtin_tasks import ALL_TASKS, BASE_TASKS, DEMO_TASKS, examples
from loader.default_model import BUILTIN_DIR, build_tokenizer, tiny_config
from loader.inject import base_weight, inject
from loader.peft_files import CONFIG_FILE, read_adapter, write_config
from loader.train_data import read_jsonl
from loader.train_job_spec import TrainJob
from loader.training_job import run_job
from server.batch import Row, Runner


class BuildError(ValueError):
    """A `loraplex build-default` request that cannot work, reported in one line before anything is trained."""


@dataclass(frozen=True)
class BuildSettings:
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 3
    intermediate: int = 384
    base_steps: int = 3000
    base_lr: float = 2e-3
    batch_size: int = 64
    adapter_steps: int = 1500
    adapter_lr: float = 5e-3
    adapter_rank: int = 16
    eval_words: int = 200
    seed: int = 0
    device: str = "cpu"


QUICK = BuildSettings(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, base_steps=4, batch_size=8,
                      adapter_steps=2, adapter_rank=4, eval_words=8)
ADAPTER_JOBS = {  # kind -> extra TrainJob fields (ranks scale with settings.adapter_rank)
    "lora": lambda r: {},
    "adalora": lambda r: {"init_r": r + r // 2, "target_r": r, "orth_reg_weight": 0.1},
    "hydralora": lambda r: {"rank": max(1, r // 2), "heads": 3},
    "reslora": lambda r: {"structure": "bs", "pre_num": 1},
}
# The mixture adapter learns three tasks (more steps) and its router is less stable at the one-task lr:
# at rank 12, lr 5e-3 it stalled (train loss 2.7, 0% exact); rank 8, lr 3e-3, 2000 steps reached 100%.
STEPS_FACTOR = {"hydralora": 4 / 3}
LR_FACTOR = {"hydralora": 0.6}
TASK_WEIGHTS = {"double": 2}  # the hardest of the three (it must count to stop): sampled twice as often


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Training data in `loraplex train`'s prompt/completion JSONL."""
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows))
    return path


def pretrain(out: Path, s: BuildSettings, work: Path) -> None:
    tokenizer = build_tokenizer()
    config = tiny_config("llama", len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=256)
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(config).to(s.device)
    data = write_jsonl(work / "base.jsonl", examples(sorted(BASE_TASKS), s.base_steps * s.batch_size // 4, s.seed))
    settings = TrainSettings(lr=s.base_lr, epochs=4, batch_size=s.batch_size, warmup_ratio=0.05, seed=s.seed,
                             eval_every=10 ** 9, weight_decay=0.01)
    Trainer(model, settings, tokenizer.pad_token_id).run(read_jsonl(data, tokenizer, 64))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_adapters(model_dir: Path, root: Path, s: BuildSettings, work: Path, only: list[str] | None = None) -> dict:
    logs = {}
    for adapter_id, (kind, tasks) in DEMO_TASKS.items():
        if only is not None and adapter_id not in only:
            continue
        steps = int(s.adapter_steps * STEPS_FACTOR.get(kind, 1))
        mixture = [t for t in sorted(tasks) for _ in range(TASK_WEIGHTS.get(t, 1))]
        data = write_jsonl(work / f"{adapter_id}.jsonl", examples(mixture, steps * s.batch_size, s.seed + 1))
        fields = {"rank": s.adapter_rank, "alpha": 2 * s.adapter_rank, **ADAPTER_JOBS[kind](s.adapter_rank)}
        job = TrainJob(method=kind, data=str(data), out=str(root / adapter_id), model=str(model_dir), device=s.device,
                       target_modules="all-linear", overwrite=True,
                       settings=TrainSettings(lr=s.adapter_lr * LR_FACTOR.get(kind, 1), max_steps=steps,
                                              batch_size=s.batch_size,
                                              eval_every=10 ** 9, seed=s.seed), **fields)
        if kind == "adalora":
            job = replace(job, tinit=steps // 10, tfinal=steps // 4)
        summary = run_job(job)
        (root / adapter_id / "checkpoint.pt").unlink(missing_ok=True)  # shipped adapters carry no optimizer state
        _forget_build_path(root / adapter_id)
        logs[adapter_id] = {"kind": kind, "steps": summary["steps"], "seconds": summary["seconds"],
                            "final_train_loss": summary["train_loss"][-1][1]}
    return logs


def _forget_build_path(adapter_dir: Path) -> None:
    """The demo adapters belong to the built-in model, whatever scratch directory it was built in: they record no
    base path (as `loraplex train` does for the default model), not one that exists only on the build machine."""
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    write_config(adapter_dir, {**config, "base_model_name_or_path": None})


@torch.inference_mode()
def greedy(runner: Runner, prompts: list[list[int]], slot: int, eos: int, max_new: int = 16) -> list[list[int]]:
    batch, logits = runner.prefill([Row(p, slot) for p in prompts])
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        for i, (row, token) in enumerate(zip(batch.rows, logits.argmax(-1).tolist())):
            row.last_token = token
            if not done[i]:
                done[i] = token == eos
                if not done[i]:
                    out[i].append(token)
        if all(done):
            break
        logits = runner.decode_step(batch)
    return out


def served_accuracy(model_dir: Path, plan: dict[str | None, tuple[Path | None, list[str]]], eval_words: int,
                    seed: int, device: str = "cpu") -> tuple[dict[str, float], dict[str, int]]:
    """Exact match on held-out words through the serving stack (slot bank + Runner, as the server runs them).
    `plan` maps an adapter id (None = the base model) to its directory and the tasks to measure it on.
    Returns accuracies keyed `<adapter id or base>/<task>` and each adapter's served parameter count."""
    base = load_base_model(str(model_dir), device, "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=max(1, len(plan)), max_rank=128, device=torch.device(device),
                    dtype=torch.float32)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    by_name = {x.name: x for x in shapes}
    eos = next(iter(base.eos_token_ids))
    result, params = {}, {}
    for adapter_id, (path, tasks) in plan.items():
        slot = 0
        if adapter_id is not None:
            adapter = read_adapter(path, adapter_id, by_name, 128, 1, base_weight=lambda n: base_weight(base.model, n))
            params[adapter_id] = adapter.size_bytes // 4  # canonical factors are fp32
            slot = bank.acquire(adapter)
        for task in sorted(tasks):
            rows = examples([task], eval_words, seed + 99, evaluation=True)
            prompts = [base.tokenizer(r["prompt"]).input_ids for r in rows]
            got = [base.tokenizer.decode(t) for t in greedy(runner, prompts, slot, eos)]
            hits = sum(g == r["completion"] for g, r in zip(got, rows))
            result[f"{adapter_id or 'base'}/{task}"] = hits / len(rows)
    return result, params


def accuracy(model_dir: Path, adapter_root: Path, s: BuildSettings) -> dict:
    """Per demo adapter on its tasks; the base on every task (it must fail the demo tasks: they are what the
    adapters add)."""
    plan = {None: (None, sorted(ALL_TASKS)),
            **{a: (adapter_root / a, sorted(tasks)) for a, (_, tasks) in DEMO_TASKS.items()}}
    return served_accuracy(model_dir, plan, s.eval_words, s.seed, s.device)[0]


def check_only(out: Path, only: list[str]) -> None:
    """--adapters names demo adapters, to retrain on the base model already built in `out`, whose other demo
    adapters BUILD.json measures again: an unknown id (a typo) would retrain nothing and rewrite BUILD.json, and an
    `out` without the base model or the other adapters would fail after training."""
    unknown = [adapter_id for adapter_id in only if adapter_id not in DEMO_TASKS]
    if unknown:
        raise BuildError(f"--adapters: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among the demo "
                         f"adapters: {', '.join(DEMO_TASKS)}")
    if not (out / "model" / "config.json").is_file():
        raise BuildError(f"--adapters retrains demo adapters on the base model already built in --out, and "
                         f"{out / 'model'} holds none (no config.json): build it first, without --adapters")
    missing = [a for a in DEMO_TASKS if a not in only and not (out / "adapters" / a / CONFIG_FILE).is_file()]
    if missing:
        raise BuildError(f"--adapters retrains some demo adapters and measures them all, and {out / 'adapters'} lacks "
                         f"{', '.join(missing)}: name {'it' if len(missing) == 1 else 'them'} too, or build without "
                         f"--adapters")


def build(out: Path = BUILTIN_DIR, settings: BuildSettings = BuildSettings(), only: list[str] | None = None) -> dict:
    """Everything, or with `only`: retrain just those demo adapters on the base already in `out` (same seeds,
    so the result equals a full build's). BUILD.json keeps each part's measured seconds."""
    start = time.perf_counter()
    model_dir, root = out / "model", out / "adapters"
    if only is not None:
        check_only(out, only)
    previous = json.loads((out / "BUILD.json").read_text()) if only and (out / "BUILD.json").exists() else {}
    with tempfile.TemporaryDirectory(prefix="loraplex-build-") as tmp:
        if only is None:
            pretrain(model_dir, settings, Path(tmp))
        base_seconds = time.perf_counter() - start if only is None else previous.get("base_seconds")
        logs = {**previous.get("adapters", {}), **train_adapters(model_dir, root, settings, Path(tmp), only)}
    eval_start = time.perf_counter()
    scores = accuracy(model_dir, root, settings)
    eval_seconds = time.perf_counter() - eval_start
    parts = (base_seconds or 0) + sum(a["seconds"] for a in logs.values()) + eval_seconds
    report = {"settings": asdict(settings), "base_seconds": round(base_seconds or 0, 1), "adapters": logs,
              "eval_seconds": round(eval_seconds, 1), "accuracy": scores,
              # a full build's time: measured directly, or the sum of the measured parts after a partial rebuild
              "seconds": round(time.perf_counter() - start if only is None else parts, 1),
              "seconds_measured_as": "one run" if only is None else "sum of parts (partial rebuild)"}
    (out / "BUILD.json").write_text(json.dumps(report, indent=2))
    return report

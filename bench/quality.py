"""Method-quality benchmark (issue 5 §4): LoRA, AdaLoRA, HydraLoRA and ResLoRA on the built-in model's tasks.

Every method trains with `loraplex train`'s own job runner on the same data, steps, learning rate and seeds, on
tasks the built-in base model never saw (words held out by the same hash split as the demo adapters):
- single tasks (reverse, caesar): LoRA r; AdaLoRA init_r 1.5r -> target_r r (the same final rank budget);
  ResLoRA is/bs/ms at rank r (pre_num 1), measured unmerged (training form) and merged with each merge method;
- the three-task mixture of the wordplay demo (double, swap, rotate): LoRA r against HydraLoRA with 3 heads at
  the largest rank whose trainable parameters do not exceed LoRA's.
Exact match is measured twice: in the training form (the trained PyTorch modules, greedy) and as served (the
saved adapter through the slot bank and Runner, ResLoRA merged at load). Convergence is the first step where
the train loss, averaged over a 20-step window, falls to --loss-threshold.

    .venv/bin/python bench/quality.py [--steps 200] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.layer import linear_dims  # noqa: E402
from adapters.reslora import MERGE_METHODS  # noqa: E402
from adapters.targets import ALL_LINEAR, linear_modules  # noqa: E402
from adapters.training import TrainSettings  # noqa: E402
from loader.builtin import served_accuracy, write_jsonl  # noqa: E402
from loader.builtin_tasks import examples  # noqa: E402
from loader.default_model import BUILTIN_DIR  # noqa: E402
from loader.merge import merge_reslora  # noqa: E402
from loader.train_job_spec import TrainJob  # noqa: E402
from loader.training_job import _load, run_job  # noqa: E402

SINGLE = ["reverse", "caesar"]
MIXTURE = ["double", "rotate", "swap"]
HEADS = 3
MAX_NEW = 16  # longest answer: a doubled 7-letter word, its space and EOS
WINDOW = 20


def hydra_rank(model, lora_rank: int) -> tuple[int, int, int]:
    """(rank, hydra params, lora params): the largest Hydra rank with no more trainable parameters than LoRA's
    (per layer: r·d_in + K·r·d_out + K·d_in for the shared A, K B heads and the router)."""
    dims = [linear_dims(m) for _, m in linear_modules(model, ALL_LINEAR)]
    lora = sum(lora_rank * (i + o) for i, o in dims)

    def hydra(r: int) -> int:
        return sum(r * i + HEADS * r * o + HEADS * i for i, o in dims)
    r = max(r for r in range(1, lora_rank + 1) if hydra(r) <= lora)
    return r, hydra(r), lora


@torch.no_grad()
def training_form_accuracy(model, tokenizer, tasks: list[str], words: int, seed: int) -> dict[str, float]:
    """Greedy exact match with the trained modules themselves (no KV cache, so the ResLoRA chains see whole
    sequences); prompts are grouped by length so no row is padded."""
    model.eval()
    eos = tokenizer.eos_token_id
    result = {}
    for task in tasks:
        rows = examples([task], words, seed + 99, evaluation=True)  # the same words served_accuracy uses
        by_length: dict[int, list[int]] = {}
        encoded = [tokenizer(r["prompt"]).input_ids for r in rows]
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        hits = 0
        for members in by_length.values():
            ids = torch.tensor([encoded[i] for i in members])
            start = ids.shape[1]
            for _ in range(MAX_NEW):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            for i, out in zip(members, ids[:, start:].tolist()):
                out = out[:out.index(eos)] if eos in out else out
                hits += tokenizer.decode(out) == rows[i]["completion"]
        result[task] = hits / len(rows)
    return result


def steps_to(losses: list[tuple[int, float]], threshold: float) -> int | None:
    values = [v for _, v in losses]
    for end in range(WINDOW, len(values) + 1):
        if sum(values[end - WINDOW:end]) / WINDOW <= threshold:
            return end
    return None


def run_one(name: str, fields: dict, tasks: list[str], model_dir: Path, work: Path, args, seed: int) -> list[dict]:
    """Train one config on `tasks`; one result row for its training form and one per served form."""
    out = work / f"{name.replace(' ', '_')}-{'+'.join(tasks)}-{seed}"
    data = write_jsonl(work / f"{'+'.join(tasks)}-{seed}.jsonl",
                       examples(tasks, args.steps * args.batch_size, seed + 1))
    job = TrainJob(data=str(data), out=str(out), model=str(model_dir), target_modules="all-linear",
                   overwrite=True, settings=TrainSettings(lr=args.lr, max_steps=args.steps,
                                                          batch_size=args.batch_size, eval_every=10 ** 9, seed=seed),
                   **fields)
    trained = {}
    summary = run_job(job, inspect=lambda model, tokenizer: trained.update(
        training_form_accuracy(model, tokenizer, tasks, args.eval_words, seed)))
    common = {"config": name, "tasks": "+".join(tasks), "seed": seed,
              "trainable": summary["trainable_params"], "seconds": summary["seconds"],
              "steps_to_threshold": steps_to(summary["train_loss"], args.loss_threshold),
              "mean_loss": statistics.fmean(v for _, v in summary["train_loss"])}
    rows = [{**common, "form": "training", "accuracy": statistics.fmean(trained.values()), "per_task": trained}]
    served = {None: out} if fields["method"] != "reslora" else {
        m: merge_reslora(out, work / f"{out.name}-{m}", str(model_dir), method=m) and work / f"{out.name}-{m}"
        for m in MERGE_METHODS[fields["structure"]]}
    for method, path in served.items():
        got, params = served_accuracy(model_dir, {"x": (path, tasks)}, args.eval_words, seed)
        per_task = {k.split("/", 1)[1]: v for k, v in got.items()}
        error = (summary["merge_error"] or {}).get(method) if method else None
        rows.append({**common, "form": "served" if method is None else f"merged ({method})",
                     "served_params": params["x"], "merge_error": error,
                     "accuracy": statistics.fmean(per_task.values()), "per_task": per_task})
    print(f"  {name} on {'+'.join(tasks)} seed {seed}: " + ", ".join(
        f"{r['form']} {r['accuracy']:.3f}" for r in rows) + f" ({summary['seconds']:.0f}s)", file=sys.stderr)
    return rows


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def report(rows: list[dict], args, hydra: tuple[int, int, int]) -> str:
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tasks"], r["config"], r["form"]), []).append(r)
    lines = ["| tasks | method | form | exact match (per seed) | per task | trainable params | served params | train s "
             f"| steps to loss ≤ {args.loss_threshold} | mean train loss | merge error |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (tasks, config, form), members in groups.items():
        per_task = {t: statistics.fmean(m["per_task"][t] for m in members) for t in members[0]["per_task"]}
        reached = [m["steps_to_threshold"] for m in members]
        seeds = "/".join(f"{m['accuracy']:.2f}" for m in members)
        lines.append(f"| {tasks} | {config} | {form} | {mean_of(members, 'accuracy'):.3f} ({seeds}) | "
                     + " ".join(f"{t} {v:.2f}" for t, v in per_task.items())
                     + f" | {members[0]['trainable']:,} | {fmt(members[0].get('served_params'), ',')} | "
                     f"{mean_of(members, 'seconds'):.0f} | "
                     + "/".join("never" if s is None else str(s) for s in reached)
                     + f" | {mean_of(members, 'mean_loss'):.3f} | {fmt(mean_of(members, 'merge_error'), '.3g')} |")
    return "\n".join(lines) + "\n\n" + "\n".join(claims(groups, hydra))


def claims(groups: dict[tuple, list[dict]], hydra: tuple[int, int, int]) -> list[str]:
    """Each claim with its per-seed differences: a mean that favours one side while the seeds disagree is
    reported as such, not as a win."""
    def per_seed(task_groups: list[str], config: str, form: str, key: str = "accuracy") -> list[float]:
        rows = [groups[(t, config, form)] for t in task_groups]
        return [statistics.fmean(r[i][key] for r in rows) for i in range(len(rows[0]))]

    def compare(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> str:
        diffs = [(a - b) if higher_is_better else (b - a) for a, b in zip(ours, theirs)]
        wins = sum(d > 0 for d in diffs)
        verdict = "holds" if statistics.fmean(diffs) >= 0 else "does NOT hold"
        return (f"{statistics.fmean(ours):.3f} vs {statistics.fmean(theirs):.3f} -> {verdict} (better in {wins} of "
                f"{len(diffs)} seeds; per-seed differences " + "/".join(f"{d:+.3f}" for d in diffs) + ")")
    out = []
    lora = per_seed(SINGLE, "lora", "served")
    out.append("- AdaLoRA >= LoRA at equal final rank budget (exact match, mean of the single tasks): "
               + compare(per_seed(SINGLE, "adalora", "served"), lora))
    mix = ["+".join(MIXTURE)]
    out.append(f"- HydraLoRA >= LoRA on the mixture at equal parameters (Hydra r={hydra[0]}: {hydra[1]:,} vs LoRA "
               f"{hydra[2]:,}): " + compare(per_seed(mix, "hydralora", "served"), per_seed(mix, "lora", "served")))
    lora_loss = per_seed(SINGLE, "lora", "training", "mean_loss")
    for structure in ("is", "bs", "ms"):
        config = f"reslora {structure}"
        unmerged = statistics.fmean(per_seed(SINGLE, config, "training"))
        merged = {m: statistics.fmean(per_seed(SINGLE, config, f"merged ({m})")) for m in MERGE_METHODS[structure]}
        out.append(f"- ResLoRA {structure} converges faster than LoRA (mean train loss over the run, lower is "
                   f"better): " + compare(per_seed(SINGLE, config, "training", "mean_loss"), lora_loss, False)
                   + f"; exact match unmerged {unmerged:.3f}, merged " + ", ".join(
                       f"{m} {v:.3f}" for m, v in merged.items()) + f" (LoRA {statistics.fmean(lora):.3f})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=BUILTIN_DIR / "model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-words", type=int, default=200)
    p.add_argument("--loss-threshold", type=float, default=0.3)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    r = args.rank
    _, model, _ = _load(TrainJob(method="lora", data="", out="", model=str(args.model)))
    hydra = hydra_rank(model, r)
    del model
    lora = {"method": "lora", "rank": r, "alpha": 2 * r}
    single = {"lora": lora,
              "adalora": {"method": "adalora", "init_r": r + r // 2, "target_r": r, "alpha": 2 * r,
                          "tinit": args.steps // 10, "tfinal": args.steps // 4, "orth_reg_weight": 0.1},
              **{f"reslora {s}": {"method": "reslora", "rank": r, "alpha": 2 * r, "structure": s, "pre_num": 1}
                 for s in ("is", "bs", "ms")}}
    # Hydra's alpha keeps LoRA's scaling s = alpha / r, so both start from the same step size per unit of BA.
    mixture = {"lora": lora, "hydralora": {"method": "hydralora", "rank": hydra[0], "heads": HEADS,
                                           "alpha": 2 * hydra[0]}}
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="loraplex-quality-") as tmp:
        for seed in args.seeds:
            for task in SINGLE:
                for name, fields in single.items():
                    rows += run_one(name, fields, [task], args.model, Path(tmp), args, seed)
            for name, fields in mixture.items():
                rows += run_one(name, fields, MIXTURE, args.model, Path(tmp), args, seed)
    print(f"quality benchmark: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, rank {r}, "
          f"seeds {args.seeds}, {args.eval_words} held-out words per task, {time.perf_counter() - start:.0f}s\n")
    print(report(rows, args, hydra))
    return 0


if __name__ == "__main__":
    sys.exit(main())

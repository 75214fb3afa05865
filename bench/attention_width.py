"""A decode step of rows far apart in length: attention per group of similar rows (server/attention_buckets.py)
against one call over the batch's whole width, and against a batch of short rows only (interleaved rounds, medians).

    .venv/bin/python bench/attention_width.py [--rows 16] [--short 100] [--long 2000] [--threads 2]

On the benchmark model of bench/mixed_adapters.py (Llama, hidden 512, 8 layers, vocabulary 32000), through the
server's Runner (its KV cache, masks and slot bank), the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapters.slot_bank import SlotBank  # noqa: E402
from bench import micro  # noqa: E402
from bench.mixed_adapters import add_common_arguments, build_model_dir, code_version  # noqa: E402
from loader.base_model import load_base_model  # noqa: E402
from loader.inject import inject  # noqa: E402
from server.batch import Row, Runner  # noqa: E402


def runner_for(out: Path, context: int) -> Runner:
    """A Runner over the benchmark model (mixed_adapters' defaults) with `context` positions."""
    shape = argparse.ArgumentParser()
    add_common_arguments(shape)
    build_model_dir(out, shape.parse_args([]), context)
    base = load_base_model(str(out), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    return Runner(base.model, context, bank, base.pad_token_id, base.max_context)


def batch_of(runner: Runner, lengths: list[int]):
    batch = None
    for n in lengths:
        joining, _ = runner.prefill([Row([(7 * j) % 200 + 3 for j in range(n)], 0)])
        batch = joining if batch is None else runner.merge(batch, joining, runner.max_context)
    for row in batch.rows:
        row.last_token = 5
    return batch


def main() -> None:
    p = micro.parser(__doc__, rounds=9)
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=2000)
    p.set_defaults(rows=16, threads=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runner = runner_for(Path(tempfile.mkdtemp()) / "model", 4096)
    n = args.rows
    mixes = {"short only": [args.short] * n,
             f"1 long of {n}": [args.short] * (n - 1) + [args.long],
             f"{n // 4} long of {n}": [args.short] * (n - n // 4) + [args.long] * (n // 4),
             "evenly spread": [args.short + (args.long - args.short) * i // (n - 1) for i in range(n)]}
    cases = {(name, grouped): batch_of(runner, lengths) for name, lengths in mixes.items() for grouped in (True, False)}

    def step(case):
        runner.grouped = case[1]
        runner.decode_step(cases[case])
    for case in cases:
        step(case)  # warm-up, and the plan
    rounds = {case: [] for case in cases}
    for _ in range(args.rounds):  # the growing rows are the same for both sides: each case steps as often
        for case in cases:
            rounds[case].append(micro.timed(lambda: step(case), calls=3))
    short = statistics.median(rounds[("short only", False)])
    print(f"decode step of {n} rows ({args.short} / {args.long} tokens), {args.threads} thread(s), code "
          f"{code_version()}; median of {args.rounds} rounds x 3 steps")
    print("rows | groups | grouped ms | one call ms | grouped / one call | grouped / short only")
    for name in mixes:
        grouped, whole = (statistics.median(rounds[(name, g)]) for g in (True, False))
        groups = cases[(name, True)].groups
        print(f"{name} | {len(groups) if groups else 1} | {1000 * grouped:.1f} | {1000 * whole:.1f} | "
              f"{grouped / whole:.2f} | {grouped / short:.2f}")


if __name__ == "__main__":
    main()

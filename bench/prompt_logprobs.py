"""What GenerateRequest.prompt_logprobs adds to a prefill: one prefill of --rows prompts of --length tokens on the
benchmark model of bench/mixed_adapters.py (a random Llama, hidden 512, 8 layers, vocab 32000, fp32), through the
server's Runner, with no row scoring its prompt, one, and all of them (0 and 20 alternatives; and with the scored
positions projected inside the forward, as for soft-capped models), and --rows copies of one prompt, one of them
scored (a call with n completions: the prompts run are printed); interleaved rounds, medians, each relative to the
prefill scoring none.

    .venv/bin/python bench/prompt_logprobs.py [--rows 8] [--length 256] [--vocab 32000] [--device cpu] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapters.slot_bank import SlotBank  # noqa: E402
from bench.mixed_adapters import add_common_arguments, build_model_dir, sync  # noqa: E402
from loader.base_model import load_base_model  # noqa: E402
from loader.inject import inject  # noqa: E402
from server.batch import Row, Runner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraplex-prompt-logprobs-"))
    if not (work / "model" / "config.json").exists():
        build_model_dir(work / "model", args)
    base = load_base_model(str(work / "model"), args.device, "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=8, device=torch.device(args.device), dtype=torch.float32)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    prompts = [[(31 * r + 7 * i) % (args.vocab - 1) + 1 for i in range(args.length)] for r in range(args.rows)]
    every = dict.fromkeys(range(args.rows), 20)
    # (scored, projected inside the forward: the path of models whose logits are changed after the head, as
    # Gemma-2's soft-capping; server/prompt_scores.py)
    copies = [prompts[0]] * args.rows
    cases = {"none scored": ({}, False, prompts), "1 row, 0 alternatives": ({0: 0}, False, prompts),
             f"{args.rows} rows, 0 alternatives": (dict.fromkeys(range(args.rows), 0), False, prompts),
             f"{args.rows} rows, 20 alternatives": (every, False, prompts),
             f"{args.rows} rows, 20 alternatives, inside the forward": (every, True, prompts),
             f"{args.rows} copies of one prompt, 1 scored (n={args.rows})": ({0: 0}, False, copies)}
    run = {}

    def prefill(scored, inside, rows) -> float:
        runner.tap._gives_logits = not inside
        sync(args.device)
        start = time.perf_counter()
        job = runner.start_prefill([Row(prompt, 0) for prompt in rows], scored)
        runner.advance(job, job.length)
        sync(args.device)
        run[id(rows), tuple(scored)] = job.width
        return time.perf_counter() - start
    assert runner.tap.gives_logits()  # a Llama: its logits are its head's output
    times = {name: [] for name in cases}
    for case in cases.values():
        prefill(*case)  # warm-up
    for _ in range(args.rounds):
        for name, case in cases.items():
            times[name].append(prefill(*case))
    print(f"prefill of {args.rows} prompts x {args.length} tokens, vocab {args.vocab}, {args.device}, "
          f"{args.threads} thread(s); "
          f"median of {args.rounds} interleaved rounds; 'vs none' is the median of each round's ratio")
    print("case | prompts run | ms | vs none")
    for name, (scored, _, rows) in cases.items():
        ratio = statistics.median(t / b for t, b in zip(times[name], times["none scored"]))
        print(f"{name} | {run[id(rows), tuple(scored)]} | {1000 * statistics.median(times[name]):.1f} | {ratio:.2f}")


if __name__ == "__main__":
    main()

"""What GenerateRequest.logprobs adds to a step's token choice: `server.logprobs.token_logprobs` after
`server.sampling.sample` (greedy) on a batch of rows, side by side with `sample` alone (interleaved rounds, medians).

    .venv/bin/python bench/logprobs_micro.py [--rows 32] [--vocab 32000] [--threads 1]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import micro  # noqa: E402
from server.logprobs import token_logprobs  # noqa: E402
from server.sampling import SamplingParams, sample  # noqa: E402


def main() -> None:
    args = micro.parser(__doc__, rounds=15).parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab) * 3
    params, generators = [SamplingParams()] * args.rows, [None] * args.rows
    cases = {"sample only": None, "+ logprobs 0, all rows": [0] * args.rows, "+ logprobs 5, all rows": [5] * args.rows,
             "+ logprobs 20, all rows": [20] * args.rows, "+ logprobs 5, one row": [5] + [None] * (args.rows - 1)}

    def step(wanted):
        tokens = sample(logits, params, generators)
        if wanted is not None:
            token_logprobs(logits, tokens, wanted)
    rounds = {name: [] for name in cases}
    for wanted in cases.values():
        step(wanted)  # warm-up
    for _ in range(args.rounds):
        for name, wanted in cases.items():
            rounds[name].append(micro.timed(lambda: step(wanted)))
    base = statistics.median(rounds["sample only"])
    print(f"greedy choice of {args.rows} rows x {args.vocab}, {args.threads} thread(s); median of {args.rounds} "
          f"rounds x 5 calls")
    print("case | ms | / sample only")
    for name, times in rounds.items():
        ms = statistics.median(times)
        print(f"{name} | {1000 * ms:.2f} | {ms / base:.2f}")


if __name__ == "__main__":
    main()

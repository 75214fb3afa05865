"""What the penalties add to a step's token choice: `server.penalties.penalize`, `server.sampling.sample` and the
rows' history updates, for rows with repetition, presence and frequency penalties and min_new_tokens, side by side
with unpenalized rows (interleaved rounds, medians).

    .venv/bin/python bench/penalties_micro.py [--rows 32] [--vocab 32000] [--prompt 256] [--threads 1]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import micro  # noqa: E402
from server.penalties import TokenHistory, penalize  # noqa: E402
from server.sampling import SamplingParams, make_generator, sample  # noqa: E402
from server.stopping import StoppingParams  # noqa: E402

PENALTIES = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5)


def main() -> None:
    parser = micro.parser(__doc__, rounds=15)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per row (random ids)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab) * 3
    prompts = [torch.randint(0, args.vocab, (args.prompt,)).tolist() for _ in range(args.rows)]
    steps = 1 + args.rounds * 5  # every step a history takes: its buffers are sized for them

    def rows(temperature: float, penalized) -> tuple:
        params, histories = [], []
        for i in range(args.rows):
            p = SamplingParams(temperature, seed=i, **(PENALTIES if penalized(i) else {}))
            stopping = StoppingParams(steps, min_new_tokens=steps if penalized(i) else 0)
            params.append(p)
            histories.append(TokenHistory.of(prompts[i], p, stopping, frozenset({2})))
        return params, [make_generator(p) for p in params], histories

    def step(params, generators, histories) -> None:
        for history, token in zip(histories, sample(penalize(logits, histories), params, generators)):
            if history is not None:
                history.add(token)
    cases = {f"{kind}, {name}": rows(temperature, which)
             for kind, temperature in (("greedy", 0.0), ("sampled", 1.0))
             for name, which in (("no penalties", lambda i: False), ("penalties, half the rows", lambda i: i % 2),
                                 ("penalties, all rows", lambda i: True))}
    rounds = {name: [] for name in cases}
    for state in cases.values():
        step(*state)  # warm-up (and the histories' buffers)
    for _ in range(args.rounds):
        for name, state in cases.items():
            rounds[name].append(micro.timed(lambda: step(*state)))
    print(f"token choice of {args.rows} rows x {args.vocab}, prompts of {args.prompt} ids, {args.threads} thread(s); "
          f"median of {args.rounds} rounds x 5 calls")
    print("case | ms | / no penalties")
    for name, times in rounds.items():
        base = statistics.median(rounds[name.split(",")[0] + ", no penalties"])
        ms = statistics.median(times)
        print(f"{name} | {1000 * ms:.2f} | {ms / base:.2f}")


if __name__ == "__main__":
    main()

"""`server.sampling.sample` alone on batches of sampled rows: rows shaped like a real model's next-token distribution
(Zipf, the nucleus in the first few tokens) and flat rows (the nucleus spans most of the vocabulary, as at a high
temperature: the worst case, a sort of the whole row). Each mix is timed for this checkout and, with --against, for
another checkout side by side (interleaved rounds, medians).

    .venv/bin/python bench/sampling_micro.py [--rows 32] [--vocab 32000] [--top-p 0.9] [--threads 1]
                                             [--against /path/to/other/checkout]
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import micro  # noqa: E402


def load_sampling(checkout: Path):
    name = f"sampling_{abs(hash(checkout))}"
    spec = importlib.util.spec_from_file_location(name, checkout / "server/sampling.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up there)
    spec.loader.exec_module(module)
    return module


def logits_for(rows: int, flat: int, vocab: int) -> torch.Tensor:
    torch.manual_seed(0)
    zipf = -1.5 * torch.arange(1, vocab + 1, dtype=torch.float32).log()
    peaked = [zipf[torch.randperm(vocab)] for _ in range(rows - flat)]
    return torch.stack(peaked + [torch.randn(vocab) * 0.1 for _ in range(flat)])


def time_one(sampling, logits: torch.Tensor, top_p: float, repeats: int) -> float:
    params = [sampling.SamplingParams(1.0, 0, top_p, seed) for seed in range(len(logits))]
    generators = [sampling.make_generator(p) for p in params]
    sampling.sample(logits, params, generators)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampling.sample(logits, params, generators)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = micro.parser(__doc__, rounds=5)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--against", type=Path, help="another checkout's server/sampling.py, timed side by side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkouts = {"this": ROOT} | ({"against": args.against} if args.against else {})
    modules = {name: load_sampling(path) for name, path in checkouts.items()}
    print(f"sample() of {args.rows} rows x {args.vocab}, temperature 1.0, top_p {args.top_p}, {args.threads} thread(s); "
          f"median of {args.rounds} rounds x 5 calls, ms")
    print("flat rows | " + " | ".join(checkouts) + (" | against / this" if args.against else ""))
    for flat in sorted({0, 1, args.rows // 4, args.rows}):
        logits = logits_for(args.rows, flat, args.vocab)
        rounds = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, module in modules.items():
                rounds[name].append(time_one(module, logits, args.top_p, 5))
        ms = {name: 1000 * statistics.median(t) for name, t in rounds.items()}
        ratio = f" | {ms['against'] / ms['this']:.2f}" if args.against else ""
        print(f"{flat:9d} | " + " | ".join(f"{v:.1f}" for v in ms.values()) + ratio)


if __name__ == "__main__":
    main()

"""What sampling penalties cost end to end: 32 concurrent greedy requests through the real server (the
benchmark model of bench/mixed_adapters.py: a random Llama, hidden 512, 8 layers, vocab 32000, fp32), without
penalties, with repetition + presence + frequency penalties (and min_new_tokens, which bans nothing here: the
requests ignore EOS and set no stop ids), and with a repetition penalty alone; interleaved rounds in one server, median tokens/s and decode step (the step's token choice included).

    .venv/bin/python bench/penalties_e2e.py [--repeats 5] [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.mixed_adapters import EngineBench, add_common_arguments, build_model_dir, make_prompts  # noqa: E402

CONFIGS = {"no penalties": {},
           "all penalties": dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5,
                                 min_new_tokens=16),
           "repetition only": dict(repetition_penalty=1.2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    args = p.parse_args()
    args.adapters, args.rank = 1, 8  # no adapters: the server's flags still need them
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraplex-penalties-"))
    model_dir, root = work / "model", work / "adapters"
    if not (model_dir / "config.json").exists():
        build_model_dir(model_dir, args)
    root.mkdir(exist_ok=True)
    prompts = make_prompts(args)
    bench = EngineBench(model_dir, root, [], args)
    try:
        for request in CONFIGS.values():  # warm-up
            bench.round(prompts, [""] * len(prompts), args.max_new_tokens, **request)
        rates = {name: [] for name in CONFIGS}
        steps = {name: [] for name in CONFIGS}
        for _ in range(args.repeats):
            for name, request in CONFIGS.items():
                wall, tokens, stats = bench.round(prompts, [""] * len(prompts), args.max_new_tokens, **request)
                rates[name].append(sum(map(len, tokens)) / wall)
                steps[name].append(stats["decode_s"] / max(1.0, stats["decode_steps"]))
    finally:
        bench.close()
    print(f"{args.requests} greedy requests x {args.max_new_tokens} tokens, {args.threads} threads, median of "
          f"{args.repeats} interleaved rounds; 'vs none' is the median of each round's ratio to the round without "
          f"penalties run just before it (this machine's speed drifts between rounds)")
    print("config | tok/s | vs none | decode step ms | rounds")
    for name in CONFIGS:
        ratio = statistics.median(r / b for r, b in zip(rates[name], rates["no penalties"]))
        print(f"{name} | {statistics.median(rates[name]):.1f} | {ratio:.3f} | "
              f"{1000 * statistics.median(steps[name]):.1f} | " + ", ".join(f"{r:.0f}" for r in rates[name]))


if __name__ == "__main__":
    main()

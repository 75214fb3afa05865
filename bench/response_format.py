"""What response formats cost a decode step: one server (its own process) on the benchmark model of
bench/mixed_adapters.py (a random Llama, hidden 512, 8 layers, fp32) with a byte-level BPE tokenizer of 32000 tokens
trained here (the byte tokenizer of the tests has 259: llguidance's mask work grows with the vocabulary), takes
rounds of --requests requests at once, --max-new-tokens each, in turn:
  free   free text
  regex  [a-z ,.]+ (nearly every token qualifies: the mask's widest case)
  json   a JSON array of at least 200 short strings (the JSON lexer and parser at every token)
  mixed  half json, half free
Every format keeps its rows running to --max-new-tokens (an end is allowed only after the array's 200 strings,
or at 1/32000 odds a step for the regex), so every round has the same rows and steps; the table gives each
configuration's mean decode step (server metrics) and tokens/s, as a ratio to free text, medians of --repeats
interleaved rounds (each round starts at another configuration).

    .venv/bin/python bench/response_format.py [--requests 32] [--max-new-tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.mixed_adapters import ENGINE_STATS, EngineBench, add_common_arguments, build_model_dir, scrape  # noqa: E402
from loader.default_model import SPECIAL_TOKENS  # noqa: E402

JSON = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}
FORMATS = {"free": {}, "regex": {"regex": "[a-z ,.]+"}, "json": {"json_schema": JSON}}


def train_tokenizer(out: Path, vocab: int, seed: int) -> None:
    """A byte-level BPE of `vocab` tokens (the model's special tokens first) over made-up English-like words."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(60000)]
    zipf = list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))
    ends = [".", ",", "!", "?", ": 42", ' {"a": 1}']
    lines = (" ".join(rng.choices(words, cum_weights=zipf, k=12)) + rng.choice(ends) for _ in range(120000))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.set_defaults(repeats=5, adapter_kernel="auto")
    args = p.parse_args()
    args.adapters, args.rank = 1, 8
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraplex-formats-"))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_model_dir(model_dir, args)
        start = time.monotonic()
        train_tokenizer(model_dir, args.vocab, args.seed)
        print(f"tokenizer: {args.vocab} tokens trained in {time.monotonic() - start:.1f} s", file=sys.stderr)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(args.prompt_min, args.prompt_max + 1, (args.requests,), generator=g)]
    half = args.requests // 2
    configs = {name: [fmt] * args.requests for name, fmt in FORMATS.items()}
    configs["mixed"] = [FORMATS["json"]] * half + [FORMATS["free"]] * (args.requests - half)
    (work / "adapters").mkdir(exist_ok=True)
    bench = EngineBench(model_dir, work / "adapters", [], args)
    found = {name: [] for name in configs}
    try:
        for repeat in range(args.repeats + 1):  # the first round warms up (and compiles each format), not counted
            names = list(configs)
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # each round in another order
                formats = configs[name]
                before = scrape(bench.config.metrics_port)
                wall, replies = bench.loop.run_until_complete(_round(bench, prompts, formats, args.max_new_tokens))
                after = scrape(bench.config.metrics_port)
                stats = {k: after.get(m, 0.0) - before.get(m, 0.0) for k, m in ENGINE_STATS.items()}
                tokens = sum(len(r.token_ids) for r in replies)
                assert tokens == args.requests * args.max_new_tokens, f"{name}: a row ended early ({tokens} tokens)"
                if repeat:
                    found[name].append((tokens / wall, stats["decode_s"] / stats["decode_steps"]))
    finally:
        bench.close()
    free_rate = statistics.median(r for r, _ in found["free"])
    free_step = statistics.median(s for _, s in found["free"])
    print(f"\n{args.requests} rows x {args.max_new_tokens} tokens, vocab {args.vocab} (trained BPE), "
          f"{args.repeats} rounds, medians; {args.device}, {args.threads} threads\n")
    print("| config | tokens/s | vs free | decode step ms | vs free |\n|---|---:|---:|---:|---:|")
    for name, runs in found.items():
        rate, step = statistics.median(r for r, _ in runs), statistics.median(s for _, s in runs)
        print(f"| {name} | {rate:.1f} | {rate / free_rate:.3f} | {step * 1e3:.2f} | {step / free_step:.3f} |")


async def _round(bench: EngineBench, prompts: list[list[int]], formats: list[dict], max_new: int):
    start = time.perf_counter()
    replies = await asyncio.gather(*(bench.client.generate(p, "", max_new_tokens=max_new, **fmt,
                                                           **({} if fmt else {"ignore_eos": True}))
                                     for p, fmt in zip(prompts, formats)))
    return time.perf_counter() - start, replies


if __name__ == "__main__":
    main()

"""The built-in model's synthetic world: string tasks written `<task>: <input> => <output>`.

The base model is pretrained on BASE_TASKS only; each demo adapter learns tasks the base never saw.
Inputs are lowercase words; a fixed hash split keeps held-out words out of every training set."""
from __future__ import annotations

import random
import zlib

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _caesar(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


BASE_TASKS = {
    "copy": lambda w: w,
    "upper": str.upper,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "count": lambda w: str(len(w)),
}
DEMO_TASKS = {  # adapter id -> (kind, tasks)
    "reverse": ("lora", {"reverse": lambda w: w[::-1]}),
    "sort": ("adalora", {"sort": lambda w: "".join(sorted(w))}),
    "wordplay": ("hydralora", {"double": lambda w: w + w, "swap": lambda w: w[-1] + w[1:-1] + w[0],
                               "rotate": lambda w: w[1:] + w[0]}),
    "caesar": ("reslora", {"caesar": _caesar}),
}
ALL_TASKS = {**BASE_TASKS, **{t: f for _, (_, tasks) in DEMO_TASKS.items() for t, f in tasks.items()}}


def held_out(word: str) -> bool:
    return zlib.crc32(word.encode()) % 10 == 0


def words(n: int, seed: int, evaluation: bool, min_len: int = 3, max_len: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if held_out(word) == evaluation:
            out.append(word)
    return out


def prompt(task: str, word: str) -> str:
    return f"{task}: {word} =>"


def examples(tasks: list[str], n: int, seed: int, evaluation: bool = False) -> list[dict]:
    rng = random.Random(seed + 7)
    pool = words(n, seed, evaluation)
    out = []
    for word in pool:
        task = rng.choice(tasks)
        out.append({"prompt": prompt(task, word), "completion": " " + ALL_TASKS[task](word), "task": task})
    return out

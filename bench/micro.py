"""What the micro-benchmarks of a step's token choice share: their common flags and a timer."""
from __future__ import annotations

import argparse
import time


def parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """--rows, --vocab, --threads and --rounds, described by the first line of the script's `doc`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=rounds)
    return p


def timed(fn, calls: int = 5) -> float:
    """Seconds per call of `fn`, over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls

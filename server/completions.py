"""GenerateRequest.n: several completions of one prompt. The servicer prepares the request once (validation,
tokenization, the adapter resolved under its id's lock: one version for all) and queues one engine request per
completion, all or none; each is its own row and draw, merged back by index. Identical prompts of one adapter and
cache salt share their prefill (server/prompt_sharing.py), so the prompt is computed once."""
from __future__ import annotations

import dataclasses
from typing import Callable

from protos.loraplex.v1 import inference_pb2 as pb
from server.engine_messages import EngineRequest
from server.errors import InvalidArgument

MAX_COMPLETIONS = 16


def count_of(request: pb.GenerateRequest) -> int | None:
    """n, or None where it is unset (one completion, in the reply's own fields)."""
    if not request.HasField("n"):
        return None
    if not 1 <= request.n <= MAX_COMPLETIONS:
        raise InvalidArgument(f"n is {request.n}: completions of one prompt must be 1 to {MAX_COMPLETIONS}")
    return request.n


def copies(first: EngineRequest, count: int, matcher: Callable[[], object] | None) -> list[EngineRequest]:
    """`first` (made with completions=count) and count - 1 copies of it: completion i draws with seed + i (mod 2^64)
    where a seed is set, each follows its format with a matcher of its own, and only completion 0 scores the prompt
    (its prefill runs it for them all)."""
    seed = first.sampling.seed
    if first.prompt_logprobs is not None:
        first = dataclasses.replace(first, scoring_call=object())
    return [first] + [dataclasses.replace(
        first, index=i, prompt_logprobs=None, matcher=None if matcher is None else matcher(),
        sampling=first.sampling if seed is None else dataclasses.replace(first.sampling, seed=(seed + i) % 2 ** 64))
        for i in range(1, count)]

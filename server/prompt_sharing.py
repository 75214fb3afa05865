"""Which requests share a prompt's prefill (the engine's side of it; Runner.start_prefill runs each prompt once).

Requests with the same prompt and adapter version admitted together run it once; a newcomer whose prompt and adapter
a running row holds takes that row's cached keys and values and runs its last token only. A request scoring its prompt
(prompt_logprobs) shares with none: its scores are its own.
"""
from __future__ import annotations

from server.engine_messages import EngineRequest


def prompt_key(request: EngineRequest) -> tuple:
    """What makes requests' prefills the same: adapter version and prompt."""
    if request.prompt_logprobs is not None:
        return (id(request),)
    return (request.adapter.key if request.adapter is not None else None, tuple(request.prompt_ids))


def held_prompts(rows: list, longrope: bool) -> dict[tuple, int]:
    """{prompt key: a running row with it} of running `rows` (engine rows: `row.state.prompt_key`) whose cached prompt
    newcomers may take. None on LongRoPE models: a row that crossed the original length holds its prompt's keys with
    the long factors."""
    held: dict[tuple, int] = {}
    for i, row in enumerate([] if longrope else rows):
        held.setdefault(row.state.prompt_key, i)
    return held


def takes_cache(key: tuple, prompt: list[int], held: dict[tuple, int]) -> bool:
    """Whether a newcomer runs one token of its prompt, the rest copied from a running row's cache (a 1-token prompt
    has nothing to copy)."""
    return key in held and len(prompt) > 1

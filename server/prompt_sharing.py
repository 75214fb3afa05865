"""Which requests share a prompt's prefill (the engine's side of it; Runner.start_prefill runs each prompt once).

Requests with the same prompt and adapter version admitted together run it once; a newcomer whose prompt and adapter
a running row holds takes that row's cached keys and values and runs its last token only; with a prefix cache
(server/prefix_cache.py), a newcomer takes the keys and values of its prompt's first blocks that earlier requests of
its adapter ran (their prompts, and what they generated), and runs the rest. A request scoring its prompt
(prompt_logprobs) takes from none and gives to none but its call's other completions: its scores are its own, and
need its whole prompt run.
"""
from __future__ import annotations

import logging

from server.batch import Batch, Prefill, Row
from server.engine_messages import EngineRequest
from server.kv_cache import Prefix, RowKV
from server.prefix_cache import BLOCK, Block, PrefixCache

log = logging.getLogger("loraplex.engine")


def prompt_key(request: EngineRequest) -> tuple:
    """What makes requests' prefills the same: adapter version, cache salt and prompt; for the completions of a call
    that scores its prompt, that call; a preempted request's is its own (its tokens follow its prompt)."""
    if request.resume is not None:
        return ("resumed", id(request))
    if request.prompt_logprobs is not None or request.scoring_call is not None:
        return ("scored", id(request.scoring_call if request.scoring_call is not None else request))
    return (request.adapter.key if request.adapter is not None else None, request.cache_salt,
            tuple(request.prompt_ids))


def held_prompts(rows: list, longrope: bool) -> dict[tuple, int]:
    """{prompt key: a running row with it} of running `rows` (engine rows: `row.state.prompt_key`) whose cached prompt
    newcomers may take. None on LongRoPE models: a row that crossed the original length holds its prompt's keys with
    the long factors."""
    held: dict[tuple, int] = {}
    for i, row in enumerate([] if longrope else rows):
        held.setdefault(row.state.prompt_key, i)
    return held


def takes_cache(request: EngineRequest, key: tuple, held: dict[tuple, int]) -> bool:
    """Whether a newcomer runs one token of its prompt, the rest copied from a running row's cache (a 1-token prompt
    has nothing to copy; a scored prompt runs whole, though its call's other completions may be running it)."""
    return key in held and len(request.prompt_ids) > 1 and request.prompt_logprobs is None


def donors(newcomers: list[Row], held: dict[tuple, int]) -> dict[tuple, tuple[list[Row], int]]:
    """{prompt key: (the newcomers with it, the running row whose cached prompt they take)} (n samples of one prompt
    arriving apart: the first of a burst on an idle server is prefilled alone). `held`: held_prompts of the running
    rows."""
    donated: dict[tuple, tuple[list[Row], int]] = {}
    for row in newcomers:
        if takes_cache(row.state.request, row.state.prompt_key, held):
            donated.setdefault(row.state.prompt_key, ([], held[row.state.prompt_key]))[0].append(row)
    return donated


def own_prefills(newcomers: list[Row], donated: dict[tuple, tuple[list[Row], int]]) -> list[Row]:
    """The newcomers that run their prompt: those `donated` (donors) gives no running row's cache. By row, not by
    key: a scored completion shares its key with the call's copies, yet takes no cache when they do."""
    taken = {id(row) for rows, _ in donated.values() for row in rows}
    return [row for row in newcomers if id(row) not in taken]


def cache_key(request: EngineRequest) -> tuple:
    """What keys the prefix cache's blocks: the adapter's weights (the same files read again are the same weights),
    and the request's cache salt."""
    return (request.adapter.weights_key if request.adapter is not None else None, request.cache_salt)


def prefill_ids(request: EngineRequest) -> list[int]:
    """The tokens a request's prefill runs: its prompt, and a preempted one's generated tokens after it (the last
    one's logits give its next token)."""
    return request.prompt_ids if request.resume is None else request.prompt_ids + request.resume.stream.ids


def cached_blocks(cache: PrefixCache | None, request: EngineRequest) -> list[Block]:
    """The prefix cache's blocks that `request`'s prefill (prefill_ids) starts with: none for a prompt it scores."""
    if cache is None or (request.prompt_logprobs is not None and request.resume is None):
        return []
    return cache.match(cache_key(request), prefill_ids(request))


def cached_prefix(cache: PrefixCache, blocks: list[Block]) -> Prefix:
    return Prefix(len(blocks) * BLOCK, lambda n: cache.gather(blocks, n))


def prefill_groups(rows: list[Row]) -> list[list[Row]]:
    """The prefills of newcomers `rows` (engine rows): one, or two where the rows copying a cached prefix run fewer
    tokens apart from those copying none (rows of a prefill are right-aligned: beside a row that copies nothing, a
    row runs as many of its last tokens as that row's length, copied or not)."""
    hits, fresh = [r for r in rows if r.state.prefix], [r for r in rows if not r.state.prefix]
    if hits and fresh and _padded(hits) + _padded(fresh) < _padded(rows):
        return [hits, fresh]
    return [rows] if rows else []


def _padded(rows: list[Row]) -> int:
    """Tokens a prefill of `rows` runs: prompts run (rows sharing one count once) x the columns from the first that
    some row must run."""
    runs = {r.state.prompt_key: (len(r.prompt_ids), len(r.state.prefix) * BLOCK) for r in rows}
    return len(runs) * max(n - copied for n, copied in runs.values())


def prefill_inputs(cache: PrefixCache | None, rows: list[Row]) -> tuple[dict[int, int], dict[int, Prefix]]:
    """Runner.start_prefill's `scored` and `prefixes` for engine rows."""
    scored = {i: r.state.request.prompt_logprobs for i, r in enumerate(rows)
              if r.state.request.prompt_logprobs is not None and not r.state.started}  # (scored before it resumed)
    return scored, {i: cached_prefix(cache, r.state.prefix) for i, r in enumerate(rows) if r.state.prefix}


def keep_prompts(cache: PrefixCache | None, job: Prefill) -> None:
    """Keep the prompts a finished prefill ran in the prefix cache (engine rows: `row.state.request`)."""
    if cache is None:
        return
    runs = {}
    for i, row in enumerate(job.rows):
        runs.setdefault(job.run_index(i), row)
    for p, row in runs.items():
        n = len(row.prompt_ids)
        _keep(cache, row.state.request, row.prompt_ids, job.cache.row(p, job.length - n, job.length))


def keep_sequences(cache: PrefixCache | None, batch: Batch, rows: list[Row]) -> None:
    """Keep what `rows` of `batch` ran, prompt and generated tokens, in the prefix cache: a chat's next turn starts
    with them (engine rows: `row.state.stream.ids`, the last not run yet)."""
    if cache is None:
        return
    leaving = {id(row) for row in rows}
    for i, row in enumerate(batch.rows):
        if id(row) not in leaving:
            continue
        tokens = row.state.request.prompt_ids + row.state.stream.ids[:-1]  # (a resumed row's prompt_ids hold some)
        end = batch.cache.length  # rows end at the last column
        _keep(cache, row.state.request, tokens, batch.cache.row(i, end - len(tokens), end))


def _keep(cache: PrefixCache, request: EngineRequest, tokens: list[int], kv: RowKV) -> None:
    if len(tokens) < BLOCK:
        return
    try:  # the requests were served: a failure to keep their keys and values costs only later prefills
        cache.store(cache_key(request), tokens, kv)
    except Exception:
        log.exception("could not keep the keys and values of request %s in the prefix cache", request.name)

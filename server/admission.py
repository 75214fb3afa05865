"""Admission: which waiting requests join the batch at an iteration of the engine, in the waiting queue's order
(server/fair_queue.py: fair between adapters, or first come first served), within the free rows, the device slots,
the KV budget (--max-kv-tokens) and the prefill budget (--max-prefill-tokens); each one admitted becomes a row with its
state. Runs on the engine thread."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from adapters.slot_bank import SlotBank, SlotsFull
from server.batch import Row
from server.engine_messages import EngineRequest, ErrorEvent, tell
from server.errors import InternalError, ResourceExhausted
from server.fair_queue import Pending, WaitingQueue, queue_cap_message, tenant
from server.metrics import Metrics
from server.penalties import TokenHistory
from server.prefix_cache import BLOCK, Block, PrefixCache
from server.prompt_sharing import cached_blocks, prefill_ids, prompt_key, takes_cache
from server.sampling import make_generator
from server.stopping import TextStream

log = logging.getLogger("loraplex.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_queue_size: int
    max_kv_tokens: int = 1 << 62  # token slots (rows x cached positions) the running batch may reserve
    max_prefill_tokens: int = 1 << 62  # padded prompt tokens (rows x longest prompt) one iteration may prefill
    scheduling: str = "fair"  # the order waiting requests are admitted in (server/fair_queue.py): fair or fifo
    max_queue_per_adapter: int = 0  # requests one adapter (or the base model) may have waiting; 0: no limit of its own
    preemption: bool = True  # fair: rows above an adapter's share of a full batch give way (server/preemption.py)


@dataclass
class RowState:
    request: EngineRequest
    stream: TextStream
    generator: object
    history: TokenHistory | None  # what its penalties and min_new_tokens need of its tokens; None: nothing
    admitted: float
    prompt_key: tuple = ()  # rows with equal keys can share their prompt's prefill (server/prompt_sharing.py)
    prefix: list[Block] = field(default_factory=list)  # the prefix cache's blocks its prompt starts with
    last_token_time: float = 0.0

    @property
    def started(self) -> bool:
        """Whether it generated a token already. At its row's prefill: it was preempted (server/preemption.py) and
        resumes, the prefill running its prompt and the tokens it generated, and sampling its next token."""
        return bool(self.stream.ids)


def plan(requests: list) -> tuple[int, int]:
    """(columns, token slots) a batch of `requests` may grow to, if every row stayed until the longest finished."""
    # Rows are right-aligned and leading pad columns are trimmed, so the width is the longest live row, and
    # no row ever holds more than its prompt + max_new_tokens: known on the host, no device sync per step.
    peak = max(map(final, requests), default=0)
    return peak, len(requests) * peak


def final(request: EngineRequest) -> int:
    """The most columns a request's row may hold: its prompt and max_new_tokens."""
    return len(request.prompt_ids) + request.stopping.max_new_tokens


def internal_failure(exc: Exception) -> InternalError:
    """What a request hears when the engine failed on its behalf: the exception's type only (the traceback is
    logged; its text may hold internals)."""
    return InternalError(f"request failed inside the engine: {type(exc).__name__}")


class Admission:
    """Admits requests from the engine's waiting queue (shared with the engine, which appends and drops cancelled
    ones) and keeps their counts (`pending`, shared with submit on any thread)."""

    def __init__(self, config: EngineConfig, bank: SlotBank, prefixes: PrefixCache | None, tokenizer,
                 eos_token_ids: frozenset[int], waiting: WaitingQueue, pending: Pending) -> None:
        self.config, self.bank, self.prefixes = config, bank, prefixes
        self.tokenizer, self.eos = tokenizer, eos_token_ids
        self.waiting, self.pending = waiting, pending

    def admit(self, rows: list[Row], chunking: bool, held: dict[tuple, int], metrics: Metrics) -> list[Row]:
        """The newcomers of an iteration, as rows holding their slots. `rows`: those holding slots already (running
        or prefilling); `chunking`: a long prompt is being prefilled in chunks; `held`: the running rows' prompts
        newcomers may copy (prompt_sharing.held_prompts); `metrics`: the engine's (a scratch set while it warms up)."""
        room = self.config.max_batch_size - len(rows)
        admitted: list[Row] = []
        try:
            self._walk(room, rows, chunking, held, metrics, admitted)
        except Exception as exc:  # a bug: the requests admitted so far hear it too (_reset fails the others)
            for row in admitted:
                self.bank.release(row.slot)
                tell(row.state.request, ErrorEvent(internal_failure(exc)))
            self.pending.leave([row.state.request for row in admitted])
            raise
        # rows free with nothing left waiting for them (a request still waiting was held back by the KV or prefill
        # budget or a slot, or the rows are full); set before they leave the count, so submit() never sees a looser
        # limit
        self.pending.free = 0 if self.waiting else max(0, room - len(admitted))
        if admitted:
            self.pending.leave([row.state.request for row in admitted])
            metrics.running.set(len(rows) + len(admitted))
            metrics.adapter_slots_used.set(self.bank.used)
            if self.config.max_queue_per_adapter:
                self._refuse_excess(max(0, room - len(admitted)))
        return admitted

    def _refuse_excess(self, free_rows: int) -> None:
        """--max-queue-per-adapter once the rows are given out: each adapter's newest requests beyond it (and the rows
        still free) are refused, as on arrival, where fair admission gave the free rows they were counted on to other
        adapters' later requests. Completions of a call with n are not: they were taken whole (overshoot under n)."""
        cap = self.config.max_queue_per_adapter
        for request in self.waiting.beyond(cap + free_rows):
            if request.completions > 1 or request.resume is not None:  # (a preempted one started: never refused)
                continue
            self.waiting.take(request)
            self.pending.leave([request])
            tell(request, ErrorEvent(ResourceExhausted(queue_cap_message(tenant(request), cap))))

    def _walk(self, room: int, rows: list[Row], chunking: bool, held: dict[tuple, int], metrics: Metrics,
              admitted: list[Row]) -> None:
        """Admit waiting requests into `admitted`, in their order, while rows, slots and budgets allow."""
        slot_wait = False
        # the distinct prompts the newcomers' prefill runs (Runner.start_prefill runs each once), and the longest; a
        # copy of one, or of a prompt a running row holds (it runs one token), adds nothing to prefill
        prompts, longest, matched = set(), 0, {}
        peak, count = plan([r.state.request for r in rows])[0], len(rows)  # the KV plan's rows, the admitted ones' too
        for request in self.waiting.candidates() if room > 0 else ():  # fair between adapters, or in arrival order
            fits = not count or (count + 1) * max(peak, final(request)) <= self.config.max_kv_tokens
            if slot_wait and request.adapter is not None:
                # An earlier request waits for a slot to drain: a row joining any slot would keep it busy longer,
                # and steady traffic on resident adapters would starve that request (base-model rows hold no slot).
                # Only its KV room is asked (a walk passes over each such request every step): as below. (Its
                # prompt's cached prefix is not looked up, so not kept recent, while it waits.)
                if not fits:
                    break
                continue
            prompt = prompt_key(request)
            runs = prompt not in prompts and not takes_cache(request, prompt, held)
            # a copy of a prompt admitted now takes its blocks (one prefill runs both); a running row's takes none
            blocks = cached_blocks(self.prefixes, request) if runs else matched.get(prompt, [])
            ids = prefill_ids(request)
            to_run = len(ids) - len(blocks) * BLOCK
            if chunking and to_run > self.config.max_prefill_tokens and runs:
                # One long prompt chunks at a time: a second one waits in its place for its last chunk (then goes
                # in its turn), and the requests after it that one prefill runs whole go ahead meanwhile. Unless
                # running rows hold its adapter's slot, later adapter rows wait as for a slot (above): steady traffic
                # on a resident adapter would keep every slot busy, and it would never get one.
                slot_wait = slot_wait or (request.adapter is not None and not self.bank.held(request.adapter.key))
                continue
            if not fits:
                break  # in its turn: later requests wait too, so a large one is never starved
            # The rest next step: running rows get a token between prefills, not after all of them. While a long
            # prompt runs in chunks, only a group that one prefill runs whole joins.
            if runs and (admitted or chunking) and \
                    (len(prompts) + 1) * max(longest, to_run) > self.config.max_prefill_tokens:
                break
            try:
                slot = self.bank.acquire(request.adapter)
            except SlotsFull:  # every slot serves running rows: wait for one to drain, in turn
                slot_wait = True
                continue
            except Exception as exc:  # e.g. out of memory writing the slot: this request fails, the rest go on
                self._fail_admission(request, exc)
                continue
            resumed, request.resume = request.resume, None
            try:
                state = resumed or RowState(
                    request, TextStream(self.tokenizer, request.stopping, self.eos, request.prompt_ids),
                    make_generator(request.sampling),
                    TokenHistory.of(request.prompt_ids, request.sampling, request.stopping, self.eos), time.monotonic())
            except Exception as exc:  # a bug: this request fails alone (its slot released), never lost to a reset
                self.bank.release(slot)
                self._fail_admission(request, exc)
                continue
            state.prompt_key, state.prefix = prompt, blocks
            # a resumed request's tenant is not charged again for what it ran before, nor its wait counted again
            self.waiting.take(request, prompt_tokens=to_run if runs and not resumed else 0)
            if not resumed:
                metrics.queue_time.observe(state.admitted - request.arrival)
                metrics.adapter_queue_time.labels(request.adapter_label).observe(state.admitted - request.arrival)
            admitted.append(Row(ids, slot, state, share=prompt))
            peak, count = max(peak, final(request)), count + 1
            if runs:
                prompts.add(prompt)
                matched[prompt] = blocks
                longest = max(longest, to_run)
            if len(admitted) == room:
                break

    def _fail_admission(self, request: EngineRequest, exc: Exception) -> None:
        log.exception("could not admit request %s", request.name)
        self.waiting.take(request)
        self.pending.leave([request])
        tell(request, ErrorEvent(internal_failure(exc)))

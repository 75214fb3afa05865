"""The engine thread: owns the model and runs continuous batching.

Each iteration: take new requests and control calls, drop cancelled rows, admit waiting requests
(server/admission.py, in server/fair_queue.py's order, acquiring device slots), prefill the newcomers (a long
prompt one chunk per iteration, shorter ones joining meanwhile) and merge them into the running batch, run one
decode step for every row, sample, push tokens to the requests' sinks, retire finished rows. Requests join and
leave between steps. An exception in a step fails only that step's requests.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Callable, Iterator

from adapters.slot_bank import SlotBank
from server.admission import Admission, EngineConfig, internal_failure, plan
from server.batch import Batch, Prefill, Row, Runner
from server.engine_messages import EngineRequest, ErrorEvent, FinishEvent, TokenEvent, tell
from server.errors import InternalError, Unavailable
from server.fair_queue import Pending, WaitingQueue
from server.metrics import Metrics, count_by_adapter
from server.prefix_cache import PrefixCache
from server.preemption import victim
from server.prompt_sharing import (donors, held_prompts, keep_prompts, keep_sequences, own_prefills, prefill_groups,
                                   prefill_ids, prefill_inputs)
from server.stopping import FinishReason
from server.token_choice import choose, not_finite

log = logging.getLogger("loraplex.engine")


class Engine:
    def __init__(self, runner: Runner, tokenizer, eos_token_ids: frozenset[int], config: EngineConfig,
                 metrics: Metrics, prefixes: PrefixCache | None = None) -> None:
        self.runner = runner
        self.prefixes = prefixes
        self.bank: SlotBank = runner.bank
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.config = config
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = WaitingQueue(fair=config.scheduling == "fair")
        self._pending = Pending(config.max_queue_size, config.max_queue_per_adapter, config.max_batch_size,
                                metrics.waiting)
        self._admission = Admission(config, self.bank, prefixes, tokenizer, eos_token_ids, self._waiting,
                                    self._pending)
        self._batch: Batch | None = None
        self._prefilling: Prefill | None = None  # newcomers whose prompts run a chunk per iteration
        self._wake = threading.Event()
        self._stop = False
        self.draining = False
        self._refusal: Exception | None = None  # what requests hear once draining
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)

    # -- any thread -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, *requests: EngineRequest) -> None:
        """Queue a request's completions (one, or GenerateRequest.n of them), all or none."""
        if self.draining or self._stop:
            raise Unavailable("the server is shutting down; retry on another replica")
        if not self.alive:
            raise Unavailable("the engine has stopped; this replica cannot serve")
        self._pending.enter(list(requests), self._inbox.put)
        self._wake.set()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between steps (slot bank changes must not race a forward)."""
        future: Future = Future()
        if not self.alive:
            future.set_exception(Unavailable("the engine has stopped; this replica cannot serve"))
            return future
        self._inbox.put((fn, future))
        self._wake.set()
        return future

    def requests_on(self, adapter_id: str) -> Future:
        """{adapter version key: waiting or running requests} for `adapter_id` (counted between steps)."""
        def count() -> Counter:
            requests = [*self._waiting, *(row.state.request for row in self._rows())]
            return Counter(r.adapter.key for r in requests
                           if r.adapter is not None and r.adapter.adapter_id == adapter_id)
        return self.call(count)

    def waiting_for(self) -> Counter:
        """{adapter id: requests queued for it}, read from any thread at one moment (WaitingQueue.__iter__)."""
        return Counter(r.adapter.adapter_id for r in self._waiting if r.adapter is not None)

    def pending_for(self, adapter_id: str) -> int:
        """Requests of `adapter_id` ("" the base model) submitted and not yet admitted (any thread)."""
        return self._pending.of(adapter_id)

    def check_count(self, count: int) -> None:
        """InvalidArgument, as submit would say, for more completions of one request than it ever takes at once."""
        self._pending.check_count(count)

    def idle(self) -> bool:
        return self._batch is None and self._prefilling is None and self._pending.total == 0

    def drain(self, error: Exception) -> Future:
        """Accept no more requests, and end those still waiting that never started with `error` between steps: on
        another replica they start now, here they would wait for rows that may be cut when the grace runs out.
        The running ones go on, and so do the preempted ones (waiting to resume), which no longer are."""
        self._refusal = error
        self.draining = True
        return self.call(lambda: self._fail_waiting(error, started=False))

    def fail_in_flight(self, error: Exception) -> Future:
        """End every waiting and running request with `error` between steps (a shutdown's grace has run out):
        each hears why, instead of its call being cut by the transport."""
        return self.call(lambda: self._reset(error))

    # -- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                try:
                    self._iterate()
                except Exception as exc:  # a bug outside the forward: fail what is in flight, keep serving
                    log.exception("engine iteration failed; failing %d running and %d waiting requests",
                                  len(self._batch) if self._batch else 0, len(self._waiting))
                    self._reset(internal_failure(exc))
                    self._wake.wait(timeout=0.01)  # a fault that repeats must not spin a core
        finally:  # also when the thread dies: nobody is left waiting for an answer (health turns NOT_SERVING)
            stopped = Unavailable("the engine stopped")
            for _, future in self._inbox_calls():
                if future.set_running_or_notify_cancel():
                    future.set_exception(stopped)
            self._fail_all(stopped)

    def _iterate(self) -> None:
        self._take_inbox()
        self._drop_cancelled()
        self._preempt()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        if self._prefilling is not None:
            self._advance(self._prefilling)
        if self._batch is not None:
            self._decode()
        elif self._prefilling is None:
            self._wake.wait(timeout=0.05)
            self._wake.clear()

    def _rows(self) -> list[Row]:
        """Every row holding a slot: the running batch's and the prefilling ones'."""
        return (self._batch.rows if self._batch else []) + (self._prefilling.rows if self._prefilling else [])

    def _reset(self, error: Exception) -> None:
        self._fail_waiting(error)
        for row in self._rows():
            tell(row.state.request, ErrorEvent(error))
            self.bank.release(row.slot)
        self._batch = self._prefilling = None
        self._report()

    def _inbox_calls(self) -> Iterator[tuple[Callable[[], object], Future]]:
        """Empty the inbox: requests join the waiting queue, engine calls are yielded to the caller."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, EngineRequest) and self.draining:  # it passed submit's check just before the drain
                tell(item, ErrorEvent(self._refusal))
                self._pending.leave([item])
            elif isinstance(item, EngineRequest):
                self._waiting.append(item)
            else:
                yield item

    def _take_inbox(self) -> None:
        for fn, future in self._inbox_calls():
            if not future.set_running_or_notify_cancel():  # the caller gave up (its deadline): skip, don't fail
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # reported to the caller, never kills the loop
                future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.take(request)
            self._pending.leave([request])
            self._finish_metrics(request, FinishReason.CANCELLED)
        job = self._prefilling
        if job is not None and all(r.state.request.cancelled for r in job.rows):  # its next chunks are for nobody
            for row in job.rows:
                self._finish_metrics(row.state.request, FinishReason.CANCELLED)
                self.bank.release(row.slot)
            self._prefilling = None
            self._report()
        if self._batch is not None and any(r.state.request.cancelled for r in self._batch.rows):
            cancelled = [row for row in self._batch.rows if row.state.request.cancelled]
            for row in cancelled:
                self._finish_metrics(row.state.request, FinishReason.CANCELLED)
            keep_sequences(self.prefixes, self._batch, cancelled)  # a chat's next turn may hold the text it had
            self._retire([i for i, r in enumerate(self._batch.rows) if r.state.request.cancelled])

    def _preempt(self) -> None:
        """A row of an adapter above its share of a full batch gives its place to a request of an adapter below its
        own (server/preemption.py): it waits again, first of its adapter's, to resume where it stopped."""
        if not (self._waiting.fair and self.config.preemption) or self._batch is None or self.draining:
            return
        row = victim(self._waiting, self._rows(), self._batch.rows, self.config.max_batch_size, self._would_admit,
                     self._resumable)
        if row is None:
            return
        keep_sequences(self.prefixes, self._batch, [row])  # what it ran: copied, not run again, when it resumes
        self._retire([i for i, r in enumerate(self._batch.rows) if r is row])
        request = row.state.request
        request.resume = row.state
        self._waiting.put_back(request)
        self._pending.put_back(request)
        self.metrics.preempted.labels(request.adapter_label).inc()
        log.debug("request %s preempted after %d tokens", request.name, len(row.state.stream.ids))

    def _resumable(self, row: Row) -> bool:
        """Whether a prefill of the row's prompt and generated tokens gives the keys it holds. Not on a LongRoPE model
        that keeps its cache past the original length (server/rope.py) once the row passed it from a prompt within
        it: its first keys have the short factors, the later ones the long; one prefill would give all the long."""
        longrope = self.runner.longrope
        if longrope is None or self.runner.recompute_at is not None:
            return True
        sequence = len(row.state.request.prompt_ids) + len(row.state.stream.ids)
        return not len(row.prompt_ids) <= longrope.original_length < sequence

    def _would_admit(self, request: EngineRequest, leaving: Row) -> bool:
        """Whether admission would give `request` a row once `leaving` left: a slot for its adapter, room in the KV
        budget, and (while a long prompt runs in chunks) a prefill it runs whole."""
        if not self.bank.available(request.adapter):
            return False
        if self._prefilling is not None and len(prefill_ids(request)) > self.config.max_prefill_tokens:
            return False
        staying = [r.state.request for r in self._rows() if r is not leaving]
        return plan(staying + [request])[1] <= self.config.max_kv_tokens

    def _kv_plan(self, newcomers: list[EngineRequest]) -> tuple[int, int]:
        """(columns, token slots) the rows holding slots plus `newcomers` may grow to in one batch."""
        return plan([r.state.request for r in self._rows()] + newcomers)

    def _admit(self) -> list[Row]:
        return self._admission.admit(self._rows(), self._prefilling is not None, self._held_prompts(), self.metrics)

    def _prefill(self, newcomers: list[Row]) -> None:
        """Start prefilling `newcomers`: a group within --max-prefill-tokens runs whole in this iteration, a longer
        prompt becomes the one prefilling (`_prefilling`) and runs a chunk an iteration. While it runs, groups
        that fit one prefill still join, so an iteration prefills at most twice --max-prefill-tokens."""
        donated = donors(newcomers, self._held_prompts())
        groups = prefill_groups(own_prefills(newcomers, donated))
        try:  # gathers the rows' factors and copies the donors' caches and cached prefixes: can run out of memory
            # (all copied before any joins the running batch, which moves its rows' columns, or the prefix cache
            # takes a new prompt, which may evict blocks)
            self._make_room([rows for rows, _ in donated.values()] + groups)
            jobs = [self.runner.start_prefill(rows, prefixes={0: self.runner.held_prompt(self._batch, donor)})
                    for rows, donor in donated.values()]
            started = [self.runner.start_prefill(rows, *prefill_inputs(self.prefixes, rows)) for rows in groups]
        except Exception as exc:
            self._fail_prefill(newcomers, exc)
            return
        self.metrics.prompt_tokens_copied.inc(sum(job.copied for job in jobs + started))
        for job in jobs:  # one token each: run whole now
            self._advance(job)
        for job in started:  # (a prompt beyond the budget is admitted with no other group: it is the one prefilling)
            if self._prefilling is None:
                self._prefilling = job  # the caller advances it
            else:
                self._advance(job)

    def _make_room(self, groups: list[list[Row]]) -> None:
        """Admission keeps the rows' reservation within --max-kv-tokens; the running buffers may also hold places rows
        left (for rows joining in place). Where those, the prompt prefilling and the caches of the prefills about to
        run (`groups`, at most each group's rows x its longest prompt) would pass the budget, the places are given
        back first: KV memory then stays within the reservation of the running and prefilling rows."""
        if self._batch is None:
            return
        held = self._batch.cache.allocated()[0] + (self._prefilling.cache.allocated()[0] if self._prefilling else 0)
        needed = sum(len(rows) * max(len(r.prompt_ids) for r in rows) for rows in groups)
        if held + needed > self.config.max_kv_tokens:
            self.runner.shrink(self._batch, plan([r.state.request for r in self._batch.rows])[0])

    def _held_prompts(self) -> dict[tuple, int]:
        return held_prompts(self._batch.rows if self._batch else [], self.runner.longrope is not None)

    def _advance(self, job: Prefill) -> None:
        """Run `job`'s next chunk: at most --max-prefill-tokens padded tokens for the one prefilling, so the running
        rows get a token between the chunks of a long prompt (others run whole: admission kept them within it, and
        nothing would run their rest); once all ran, sample and join the running batch."""
        rows = job.rows
        start = time.monotonic()
        columns = max(1, self.config.max_prefill_tokens // job.width) if job is self._prefilling else job.length
        try:
            logits = self.runner.advance(job, columns)
            if logits is not None:
                tokens, logprobs, failed = choose(logits, [r.state for r in rows])
                # allocates the joined cache: can run out of memory too
                running = [r.state.request for r in (self._batch.rows if self._batch else [])]
                merged = self.runner.join(self._batch, job, plan(running + [r.state.request for r in rows])[0])
        except Exception as exc:
            self._fail_prefill(rows, exc)
            return
        self.metrics.step_time.labels("prefill").observe(time.monotonic() - start)
        if logits is None:
            self._report()
            return
        self._batch = merged  # before the prefill is cleared: idle() (any thread) never sees neither
        if job is self._prefilling:
            self._prefilling = None
        keep_prompts(self.prefixes, job)
        self.metrics.batch_size.labels("prefill").observe(len(rows))
        fresh = [r for r in rows if not r.state.started]  # (resumed rows ran their prompts before)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in fresh))
        self.metrics.resumed_tokens.inc(sum(len(r.prompt_ids) for r in rows if r.state.started))
        count_by_adapter(self.metrics.adapter_prompt_tokens,
                         ((r.state.request.adapter_label, len(r.prompt_ids)) for r in fresh))
        self._emit(rows, tokens, logprobs, failed={i: not_finite() for i in job.broken} | failed,
                   prompt_logprobs=job.scores)
        self._report()

    def _fail_prefill(self, rows: list[Row], exc: Exception) -> None:
        log.exception("prefill failed for %d requests", len(rows))
        for row in rows:
            self._fail_row(row, exc)
        if self._prefilling is not None and self._prefilling.rows is rows:
            self._prefilling = None
        self._report()

    def _decode(self) -> None:
        batch = self._batch
        start = time.monotonic()
        try:
            tokens, logprobs, failed = choose(self.runner.decode_step(batch), [r.state for r in batch.rows])
        except Exception as exc:
            log.exception("decode step failed for %d requests", len(batch))
            for row in batch.rows:
                self._fail_row(row, exc)
            self._batch = None
            self._report()
            return
        self.metrics.step_time.labels("decode").observe(time.monotonic() - start)
        self.metrics.batch_size.labels("decode").observe(len(batch))
        self._emit(batch.rows, tokens, logprobs, failed=failed)
        self._report()

    def _emit(self, rows: list[Row], tokens: list[int], logprobs: list,
              failed: dict[int, Exception] | None = None, prompt_logprobs: dict | None = None) -> None:
        """Each row's token (and its log-probabilities, where asked for; after a prefill, its prompt's, by row
        index, in `prompt_logprobs`) to its client; rows in `failed` (non-finite logits at its next token or a
        scored prompt position, a response format that could not be followed) fail alone instead, with its error."""
        now = time.monotonic()
        failed = failed or {}
        finished, ended = [], []
        self.metrics.generation_tokens.inc(len(rows) - len(failed))
        count_by_adapter(self.metrics.adapter_generation_tokens,
                         ((r.state.request.adapter_label, 1) for i, r in enumerate(rows) if i not in failed))
        for i, (row, token, row_logprobs) in enumerate(zip(rows, tokens, logprobs)):
            state = row.state
            if i in failed:
                (log.error if isinstance(failed[i], InternalError) else log.warning)(
                    "request %s failed at a token: %s", state.request.name, failed[i])
                tell(state.request, ErrorEvent(failed[i]))
                ended.append(row)
                continue
            row.last_token = token
            self._waiting.charge(state.request, output_tokens=1)
            matcher = state.request.matcher  # a format ends at an end id only where it is complete (then stopped)
            if state.started:  # (a resumed row's pause, while preempted, included)
                self.metrics.itl.observe(now - state.last_token_time)
            else:
                self.metrics.ttft.observe(now - state.request.arrival)
            text = state.stream.push(token, matcher is not None and token in self.eos and not matcher.is_stopped())
            state.last_token_time = now
            state.request.sink(TokenEvent([token], text, None if row_logprobs is None else [row_logprobs],
                                          (prompt_logprobs or {}).get(i)))
            if state.stream.finish is not None:
                finished.append(row)
        for row in finished:
            request = row.state.request
            self._finish_metrics(request, row.state.stream.finish)  # before the client can see the end
            request.sink(FinishEvent(row.state.stream.finish, len(request.prompt_ids), len(row.state.stream.ids)))
        if finished or ended:
            keep_sequences(self.prefixes, self._batch, finished)
            done = {id(r) for r in finished + ended}
            self._retire([i for i, r in enumerate(self._batch.rows) if id(r) in done])

    def _retire(self, indices: list[int]) -> None:
        gone = set(indices)
        # The trim may copy the cache (its buffers shrinking) and run out of memory: release nothing before it
        # succeeds, or _reset would release the leaving rows' slots a second time.
        keep = [i for i in range(len(self._batch)) if i not in gone]
        kept = self.runner.keep(self._batch, keep, plan([self._batch.rows[i].state.request for i in keep])[0])
        for i in gone:
            self.bank.release(self._batch.rows[i].slot)
        self._batch = kept
        self._report()

    def _report(self) -> None:
        """After every change to the batch: cap the cache's growth at the planned peak, and publish the running
        rows, the slots they hold and the cache's memory (cancelled or finished rows' memory is released here,
        at the step they leave; a failed step's rows are gone too)."""
        self.metrics.running.set(len(self._rows()))
        self.metrics.adapter_slots_used.set(self.bank.used)
        if not self._waiting:  # rows that left are free for the next requests (not only after the next admission)
            self._pending.free = max(0, self.config.max_batch_size - len(self._rows()))
        slots = nbytes = 0
        reserved = self._kv_plan([])[1]  # the prefilling rows join the running ones' rectangle
        if self._batch is not None:
            peak = plan([r.state.request for r in self._batch.rows])[0]
            self._batch.cache.max_length = min(self.runner.max_context, peak)
            slots, nbytes = self._batch.cache.allocated()
        if self._prefilling is not None:
            more_slots, more_bytes = self._prefilling.cache.allocated()
            slots, nbytes = slots + more_slots, nbytes + more_bytes
        self.metrics.kv_slots.set(slots)
        self.metrics.kv_bytes.set(nbytes)
        self.metrics.kv_reserved.set(reserved)
        if self.prefixes is not None:
            self.metrics.prefix_cache_tokens.set(self.prefixes.tokens)

    def _finish_metrics(self, request: EngineRequest, reason: FinishReason) -> None:
        self.metrics.success.labels(reason.value).inc()
        self.metrics.e2e.observe(time.monotonic() - request.arrival)
        self.metrics.adapter_requests.labels(request.adapter_label).inc()

    def _fail_row(self, row: Row, exc: Exception) -> None:
        self.bank.release(row.slot)
        tell(row.state.request, ErrorEvent(internal_failure(exc)))

    def _fail_waiting(self, error: Exception, started: bool = True) -> None:
        """End the waiting requests with `error`; `started`: the preempted ones too (else they wait on to resume)."""
        waiting = [r for r in self._waiting if started or r.resume is None]
        for request in waiting:
            tell(request, ErrorEvent(error))
            self._waiting.take(request)
        self._pending.leave(waiting)

    def _fail_all(self, exc: Exception) -> None:
        for request in self._waiting:
            tell(request, ErrorEvent(exc))
        for row in self._rows():
            tell(row.state.request, ErrorEvent(exc))

"""The running batch: rows, their KV cache, attention masks and adapter factors; prefill and decode.

Rows are left-padded on one shared time axis. The engine owns scheduling; this module owns tensors.
"""
from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from adapters.slot_bank import AdapterContext, RowFactors, SlotBank
from server import attention_buckets
from server.attention import AttentionLayout, UnsupportedAttention
from server.kv_cache import KVCache, Prefix
from server.logprobs import PromptLogprobs
from server.prompt_scores import SCORED_ELEMENTS, HeadTap, keep_scores, scored_positions
from server.rope import LongRope

log = logging.getLogger("loraplex.batch")


@dataclass
class Row:
    """One request while it holds a place in the batch. `state` is the engine's per-request bookkeeping."""

    prompt_ids: list[int]
    slot: int
    state: object = None
    last_token: int = -1
    fed: list[int] = field(default_factory=list)  # tokens decode steps fed it, kept only for a longrope recompute
    share: tuple | None = None  # rows prefilled together with equal keys run their prompt once; None: slot and prompt


@dataclass
class Batch:
    rows: list[Row]
    cache: KVCache
    valid: torch.Tensor       # [B, T] bool: which cached columns hold real tokens
    positions: torch.Tensor   # [B] position id of the next token
    factors: RowFactors | None = field(default=None)
    # decode attention's row groups (server/attention_buckets.py): (index, rows) each, the index a row's or a tensor
    # of them; None: one call over the width; planned at its first step (rows joining or leaving make a new Batch)
    groups: list[tuple[int | torch.Tensor, list[int]]] | None = field(default=None)
    planned: bool = False

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Prefill:
    """Prompts being prefilled, left-padded together: `done` of their columns are in `cache` so far. Rows with the
    same prompt and adapter run once (n samples of one prompt, as RL rollouts send them): `source` gives each row its
    prompt's index among the P run (None: each row runs its own)."""
    rows: list[Row]
    ids: torch.Tensor        # [P, L]
    valid: torch.Tensor      # [P, L] bool
    positions: torch.Tensor  # [P, L]
    cache: KVCache
    factors: RowFactors | None
    done: int = 0
    # GenerateRequest.prompt_logprobs: {row index: what the chunks run so far found for it (its alternatives
    # wanted: .k)}, and the rows whose logits at a prompt position were not finite
    scores: dict[int, PromptLogprobs] = field(default_factory=dict)
    broken: set[int] = field(default_factory=set)
    source: list[int] | None = None
    copied: int = 0  # prompt tokens whose keys and values were copied, not run (a prompt that rows share: once)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def width(self) -> int:
        """Prompts run (rows sharing one count once)."""
        return self.ids.shape[0]

    def run_index(self, row: int) -> int:
        return row if self.source is None else self.source[row]


# A forward's attention masks hold rows x queries x keys elements (in the model's dtype, per layer type), as do the
# scores of an attention kernel that materializes them: a prompt of 32k tokens in one pass needs 2 GB of fp16 mask.
# A prefill runs its queries in chunks that keep that near MASK_ELEMENTS, so its memory grows with the prompt's
# length, not with its square; ordinary batches (32 rows x 1024 tokens) still run in one pass.
MASK_ELEMENTS = 1 << 25
MIN_CHUNK = 256  # each chunk reads every weight once: fewer, longer chunks for very long prompts


def prefill_chunk(rows: int, length: int, projected: int = 0, vocab: int = 0) -> int:
    """Query columns per forward for a prefill of `rows` prompts left-padded to `length`, `projected` of which
    have their prompt's positions projected onto a vocabulary of `vocab` inside the forward (server/prompt_scores.py:
    their logits are held to SCORED_ELEMENTS)."""
    step = max(MIN_CHUNK, MASK_ELEMENTS // (rows * length))
    return min(step, max(1, SCORED_ELEMENTS // (projected * vocab))) if projected else step


class Runner:
    """Runs the model for batches: the only place that calls the HF forward."""

    def __init__(self, model: torch.nn.Module, context: AdapterContext, bank: SlotBank, pad_id: int,
                 max_context: int) -> None:
        self.model = model
        self.context = context
        self.bank = bank
        self.pad_id = pad_id
        self.max_context = max_context
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.vocab_size = model.config.get_text_config().vocab_size
        self.attention = AttentionLayout.of(model.config)  # raises UnsupportedAttention
        self.longrope = LongRope.install(model)  # each row's own rotary factors; None: not a longrope model
        self.recompute_at = self.longrope.recompute_at if self.longrope is not None else None
        self.tap = HeadTap(model)  # what the LM head sees (server/prompt_scores.py)
        # decode attention per group of rows of similar length (server/attention_buckets.py): measured on the CPU
        self.grouped = self.device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa"
        if self.grouped:
            attention_buckets.install()

    def check_cache(self) -> None:
        """Refuse (UnsupportedAttention) a model whose state is not all in the KV cache the batch hands it, which
        rows join and leave: recurrent, state-space or RWKV layers. A decode step through the cache must give the
        logits of a prefill of the whole sequence, and a row joining a running batch those it gets alone."""
        if "past_key_values" not in inspect.signature(self.model.forward).parameters:
            raise UnsupportedAttention("the model's forward takes no past_key_values: it keeps no KV cache "
                                       "(recurrent or state-space models keep other state, and some older models, "
                                       "as GPT-1, none), and this server batches rows through one")
        vocab = self.model.config.get_text_config().vocab_size
        first, second = [(7 * i + 3) % vocab for i in range(8)], [(5 * i + 11) % vocab for i in range(5)]

        def stepped(batch, tokens):
            for row, token in zip(batch.rows, tokens):
                row.last_token = token
            return self.decode_step(batch)
        try:
            running, _ = self.prefill([Row(first[:-1], 0)])
            empty = [i for i, pair in enumerate(running.cache.tensors()) if pair is None]
            compared = [(stepped(running, [first[-1]])[0], self.prefill([Row(first, 0)])[1][0])]
            late, late_logits = self.prefill([Row(second, 0)])
            token = int(late_logits[0].argmax())
            alone = stepped(late, [token])[0]
            late, _ = self.prefill([Row(second, 0)])
            joined = self.merge(running, late, self.max_context)
            compared.append((stepped(joined, [first[0], token])[1], alone))
        except Exception as exc:
            log.exception("the start-up check of the model's KV cache failed")
            plain = self._plain_forward_error(first)
            if plain is not None:  # not this server's cache or masks: the model fails alone (HF's generate too)
                raise UnsupportedAttention(f"the model's own forward fails on {len(first)} tokens, without this "
                                           f"server's KV cache or masks ({_first_line(plain)}): its config or weights "
                                           f"do not make a working model") from None
            raise UnsupportedAttention(f"the model's forward fails with this server's KV cache and attention masks "
                                       f"({_first_line(exc)}; traceback logged): it serves decoder LMs whose attention "
                                       f"takes 4D masks and keeps its state in the KV cache, not recurrent, "
                                       f"state-space or linear-attention layers") from None
        if len(empty) == len(running.cache.layers):
            raise UnsupportedAttention("no layer of the model keeps keys and values in the KV cache (recurrent or "
                                       "state-space layers keep other state); this server batches attention layers")
        # equal but for the order of sums (in fp32 a few ulps; bf16/fp16 round each layer's output)
        tolerance = 1e-4 if self.dtype == torch.float32 else 1e-1
        if any((got - want).abs().max() > tolerance * want.abs().max() + 1e-5 for got, want in compared):
            raise UnsupportedAttention(f"a decode step through the KV cache does not give the logits of the whole "
                                       f"sequence, or a row joining a batch those it gets alone: the model keeps "
                                       f"state outside the cache (recurrent, state-space or RWKV layers"
                                       f"{', in layers ' + str(empty) if empty else ''}), which this server cannot "
                                       f"batch")
        self.tap.gives_logits()  # now, not inside the first prefill that scores a prompt

    def _plain_forward_error(self, ids: list[int]) -> Exception | None:
        """What the model's own forward of `ids` raises, with no cache or mask of ours and no adapter (None: it runs)."""
        try:
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([ids], device=self.device))
        except Exception as exc:
            return exc
        return None

    def row_layout(self) -> list[tuple[torch.Size, torch.Size, torch.dtype] | None]:
        """Each layer's key and value shapes of one row, [heads, 1, head dim], and their dtype (None: a layer keeping
        none), as a one-token prefill finds them."""
        batch, _ = self.prefill([Row([0], 0)])
        return [None if pair is None else (pair[0].shape[1:], pair[1].shape[1:], pair[0].dtype)
                for pair in batch.cache.tensors()]

    def _forward(self, ids: torch.Tensor, masks, positions: torch.Tensor, cache: KVCache,
                 factors: RowFactors | None, picked: torch.Tensor | None = None,
                 kept: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of each row's last position, or with `picked` (flat indices over [B, Q] positions) those
        positions' [N, V]; with `kept`, those positions' final hidden states are left in `self.tap.hidden`.
        `masks`: a boolean mask [B, 1, Q, K], or one per layer type (AttentionLayout.masks)."""
        def additive(mask: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
            return out.masked_fill_(~mask, torch.finfo(self.dtype).min)
        masks = {t: additive(m) for t, m in masks.items()} if isinstance(masks, dict) else additive(masks)
        self.context.rows = factors
        headless = self.tap.head is None
        self.tap.picked, self.tap.kept = (None, None) if headless else (picked, kept)
        try:
            out = self.model(input_ids=ids, attention_mask=masks, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1 if picked is None and kept is None else 0)
        finally:
            self.context.rows = None
            self.tap.picked = self.tap.kept = None
        cache.length += ids.shape[1]
        if picked is None:
            return out.logits[:, -1, :].float()
        if headless:  # (no head module to hook: every position's logits were made)
            return out.logits.flatten(0, 1).index_select(0, picked).float()
        return out.logits[0].float()

    def prefill(self, rows: list[Row]) -> tuple[Batch, torch.Tensor]:
        """Run the prompts of `rows` (left-padded together); returns their batch and last-position logits."""
        job = self.start_prefill(rows)
        logits = self.advance(job, job.length)
        return self.prefilled(job), logits

    def start_prefill(self, rows: list[Row], scored: dict[int, int] | None = None,
                      prefixes: dict[int, Prefix] | None = None) -> Prefill:
        """The prompts of `rows` left-padded together, none of them run yet (`advance` runs them). `scored`: {row
        index: alternatives} of the rows whose prompt tokens' log-probabilities `advance` finds (Prefill.scores).
        `prefixes`: {row index: the keys and values of its prompt's first tokens, already computed}: those are
        copied, and the columns before the first one some row must run are left out (a row whose prefix ends later
        runs its last prefix tokens again: rows are right-aligned)."""
        scored, prefixes = scored or {}, prefixes or {}
        run, source, first, held = [], [], {}, []
        for i, row in enumerate(rows):
            key = row.share or (row.slot, tuple(row.prompt_ids))
            if key not in first:
                first[key] = len(run)
                run.append(row)
                held.append(prefixes.get(i))
            if i in scored:  # its scores need every position's logits: the prompt runs whole
                held[first[key]] = None
            source.append(first[key])
        prompts = [r.prompt_ids for r in run]
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(prompts), length), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p)
            valid[i, length - len(p):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        # the cache's buffers hold exactly the prompts (a fresh cache's first allocation is its max_length)
        job = Prefill(rows, ids, valid, positions, KVCache(self.num_layers, length),
                      self.bank.gather([r.slot for r in run]),
                      scores={i: PromptLogprobs(n) for i, n in scored.items()},
                      source=source if len(run) < len(rows) else None)
        start = length - max(len(p) - (h.length if h else 0) for p, h in zip(prompts, held))
        if start > 0:  # every row's columns before `start` are pads or its prefix's
            self._copy_prefixes(job, [len(p) for p in prompts], held, start)
        return job

    @staticmethod
    def _copy_prefixes(job: Prefill, lengths: list[int], held: list[Prefix | None], start: int) -> None:
        for p, (n, prefix) in enumerate(zip(lengths, held)):
            first = job.length - n  # its first token's column
            if prefix is None or first >= start:  # (without a prefix, its columns before `start` are pads)
                continue
            for layer, pair in zip(job.cache.layers, prefix.kv(start - first)):
                if pair is None:  # (a layer reading an earlier layer's keys and values keeps none)
                    continue
                if layer.k is None:
                    k, v = pair
                    layer.k = k.new_zeros(job.width, k.shape[0], job.length, k.shape[-1])
                    layer.v = v.new_zeros(job.width, v.shape[0], job.length, v.shape[-1])
                    layer.is_initialized = True
                layer.k[p, :, first:start], layer.v[p, :, first:start] = pair
            job.copied += start - first
        job.cache.length = job.done = start

    @staticmethod
    def held_prompt(batch: Batch, row: int) -> Prefix:
        """A running row's cached prompt but its last token (whose logits a newcomer with that prompt needs)."""
        first = int(batch.valid[row].long().argmax())  # a row's columns: its pads, then its tokens in order
        return Prefix(len(batch.rows[row].prompt_ids) - 1, lambda n: batch.cache.row(row, first, first + n))

    @torch.inference_mode()
    def advance(self, job: Prefill, columns: int) -> torch.Tensor | None:
        """Run the next `columns` columns of `job`'s prompts (in forwards of at most `prefill_chunk` query columns);
        the last position's logits (of every row) once every column ran, else None."""
        end = min(job.length, job.done + columns)
        apart = bool(job.scores) and self.tap.gives_logits()  # scored positions projected after the forward
        # (a model without a head module to hook projects every row's positions)
        projected = 0 if apart or not job.scores else job.width if self.tap.head is None else len(job.scores)
        step = prefill_chunk(job.width, job.length, projected, self.vocab_size)
        keys = torch.arange(job.length, device=self.device)[None]
        logits = None
        with self.longrope.whole_prompts(job.valid.sum(-1)) if self.longrope is not None else nullcontext():
            while job.done < end:
                start, stop = job.done, min(end, job.done + step)
                query, seen = keys[0, start:stop, None], keys[:, :stop]
                # causal and padding; a pad query attends to nothing real: it sees itself, so its (unused) output
                # stays finite
                mask = ((seen <= query)[None] & job.valid[:, None, :stop]) | (seen == query)[None]
                masks = self.attention.masks(mask[:, None], job.positions[:, start:stop], job.positions[:, :stop])
                scoring = scored_positions(job, start, stop)
                forward = (job.ids[:, start:stop], masks, job.positions[:, start:stop], job.cache, job.factors)
                if scoring is None:
                    logits = self._forward(*forward)
                elif apart:
                    logits = self._forward(*forward, kept=scoring[0].to(self.device))
                    hidden, self.tap.hidden = self.tap.hidden, None
                    keep_scores(job, self.tap.project(hidden, self.vocab_size), *scoring[1:])
                else:  # the scored positions, after each row's last one in the last chunk
                    last = torch.arange(job.width) * (stop - start) + (stop - start - 1) if stop == job.length else None
                    picked = scoring[0] if last is None else torch.cat([last, scoring[0]])
                    logits = self._forward(*forward, picked=picked.to(self.device))
                    kept = 0 if last is None else job.width
                    keep_scores(job, [logits[kept:]], *scoring[1:])
                    logits = logits[:kept]
                job.done = stop
        if job.done < job.length and self.device.type == "cuda":
            # nothing of a middle chunk is read back: without this, its GPU time would be timed as the next decode
            # step's (step_duration_seconds), whose sampling waits for it
            torch.cuda.synchronize(self.device)
        if job.done < job.length:
            return None
        return logits if job.source is None else logits[torch.tensor(job.source, device=self.device)]

    def prefilled(self, job: Prefill) -> Batch:
        """The batch of a finished prefill, its cache free to grow to the context (the engine caps it)."""
        job.cache.max_length = self.max_context
        if job.source is None:
            return Batch(job.rows, job.cache, job.valid, job.positions[:, -1] + 1, job.factors)
        # rows that shared a prompt get copies of its cache (one copy of the rows' cache, as a merge makes)
        index = torch.tensor(job.source, device=self.device)
        return Batch(job.rows, job.cache.select(index, 0), job.valid[index], job.positions[index, -1] + 1,
                     self.bank.gather([r.slot for r in job.rows]))

    @torch.inference_mode()
    def decode_step(self, batch: Batch) -> torch.Tensor:
        """Feed every row its last token; returns next-token logits [B, V]."""
        ids = torch.tensor([[r.last_token] for r in batch.rows], dtype=torch.long, device=self.device)
        batch.valid = torch.cat([batch.valid, batch.valid.new_ones(len(batch), 1)], dim=1)
        query = batch.positions[:, None]
        # A row's columns are its tokens in order after its pads, so a key's position is its count of real columns.
        keys = batch.valid.long().cumsum(-1) - 1 if self.attention.window is not None else None
        masks = self.attention.masks(batch.valid[:, None, None, :], query, keys)
        with attention_buckets.grouped(self._attention_groups(batch)):
            logits = self._forward(ids, masks, query, batch.cache, batch.factors)
        batch.positions = batch.positions + 1
        if self.recompute_at is not None:
            logits = self._recompute_crossing(batch, logits)
        return logits

    def _attention_groups(self, batch: Batch) -> list[tuple[int | torch.Tensor, int]] | None:
        """This step's (rows, width) groups for decode attention, or None: one call over the batch's width."""
        if not self.grouped or len(batch) < 2 or (batch.planned and batch.groups is None):
            return None
        lengths = batch.valid.sum(-1).tolist()  # a row's real columns, the last of the axis (the CPU: no sync)
        if not batch.planned:
            groups = attention_buckets.plan(lengths)
            batch.groups = None if groups is None else [
                (g[0] if len(g) == 1 else torch.tensor(g, device=self.device), g) for g in groups]
            batch.planned = True
        if batch.groups is None:
            return None
        return [(index, max(lengths[i] for i in rows)) for index, rows in batch.groups]

    def _recompute_crossing(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """Longrope families whose HF generate drops the cache when a sequence first passes the original length
        (server/rope.py): a row that just fed its token at that position is run again alone, its whole sequence
        with the long factors, and its cache columns and logits replaced, as HF generate does for it alone."""
        crossing = []
        for i, row in enumerate(batch.rows):
            if len(row.prompt_ids) + len(row.fed) <= self.recompute_at:  # needed until then, and never after
                row.fed.append(row.last_token)
                if len(row.prompt_ids) + len(row.fed) - 1 == self.recompute_at:
                    crossing.append(i)
        # One row at a time: each recompute holds a second cache of recompute_at + 1 positions for its rows (1.6 GB
        # per row for Phi-3-mini in bf16), outside --max-kv-tokens; rows admitted together cross together.
        for i in crossing:
            row = batch.rows[i]
            job = self.start_prefill([Row(row.prompt_ids + row.fed, row.slot)])
            fresh = self.advance(job, job.length)
            n, end = job.cache.length, batch.cache.length  # a row's columns are the last ones of the shared time axis
            for mine, pair in zip(batch.cache.tensors(), job.cache.tensors()):
                if pair is not None:
                    mine[0][i, :, end - n:end] = pair[0][0]
                    mine[1][i, :, end - n:end] = pair[1][0]
            del job
            logits[i] = fresh[0]
        return logits

    @torch.inference_mode()  # the buffers are inference tensors: changed in place only in inference mode
    def keep(self, batch: Batch, keep: list[int], peak: int) -> Batch | None:
        """The batch without the rows not in `keep` (indices), trimming pad columns no row needs any more. In place:
        the last rows kept take the places of the rows leaving (the rows' order changes), and only they are copied.
        `peak`: the columns the rows kept may grow to (KVCache.compact)."""
        if not keep:
            return None
        if len(keep) == len(batch):
            return batch
        order, kept = list(range(len(keep))), set(keep)
        places = [i for i in order if i not in kept]
        for place, row in zip(places, [i for i in keep if i >= len(keep)]):
            order[place] = row
        index = torch.tensor(order, device=self.device)
        valid = batch.valid.index_select(0, index)
        start = int(valid.any(dim=0).long().argmax())
        batch.cache.compact(order, start, min(peak, self.max_context))
        new_rows = [batch.rows[i] for i in order]
        return Batch(new_rows, batch.cache, valid[:, start:].contiguous(), batch.positions.index_select(0, index),
                     self.bank.gather([r.slot for r in new_rows]))

    def join(self, a: Batch | None, job: Prefill, max_length: int) -> Batch:
        """The rows of a finished prefill joined to `a`'s (`merge` of its batch): rows that shared a prompt are copied
        from its cache into the joined one, not into a batch of their own first."""
        if a is None or job.source is None:
            return self.merge(a, self.prefilled(job), max_length)
        index = torch.tensor(job.source, device=self.device)
        return self.merge(a, Batch(job.rows, job.cache, job.valid[index], job.positions[index, -1] + 1), max_length,
                          cache_rows=index)

    @torch.inference_mode()
    def merge(self, a: Batch | None, b: Batch, max_length: int, cache_rows: torch.Tensor | None = None) -> Batch:
        """`b`'s rows joined to `a`'s, in the places rows that left `a` left where there are enough (a's cache is then
        the joined one's), else in new buffers; `max_length`: the longest the joined cache may grow (its planned
        peak). `cache_rows`: the row of `b.cache` each of `b`'s rows takes (KVCache.merge)."""
        if a is None:
            return b
        length = max(a.valid.shape[1], b.valid.shape[1])
        pad = lambda v: torch.cat([v.new_zeros(v.shape[0], length - v.shape[1]), v], dim=1)  # noqa: E731
        rows = a.rows + b.rows
        # everything that can fail (run out of memory) before `a`'s cache changes: the engine goes on with `a` then
        valid, positions = torch.cat([pad(a.valid), pad(b.valid)]), torch.cat([a.positions, b.positions])
        factors = self.bank.gather([r.slot for r in rows])
        cache = a.cache if a.cache.place(b.cache, cache_rows) else \
            KVCache.merge(a.cache, b.cache, min(max_length, self.max_context), cache_rows)
        return Batch(rows, cache, valid, positions, factors)

    @torch.inference_mode()
    def shrink(self, batch: Batch, peak: int) -> None:
        """Give back the places rows that left `batch` left (KVCache.shrink; `peak`: what its rows may grow to)."""
        batch.cache.shrink(min(peak, self.max_context))


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

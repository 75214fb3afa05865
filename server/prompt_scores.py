"""Scoring prompt tokens while they are prefilled (GenerateRequest.prompt_logprobs): which positions score which
tokens, the model's LM head seeing only the positions wanted, and the scores kept per row.

The head is hooked (HeadTap): an ordinary forward hands it each row's last position, contiguous. Where the model's
logits are its head's output itself (no soft-capping or scaling after it: checked once, on the model), a scoring
forward keeps the scored positions' hidden states aside and projects them after it, in blocks of SCORED_ELEMENTS
logits: the prefill's chunks stay as long as without scoring. Elsewhere (Gemma-2's soft-capping, Cohere's scale) the
head gets the scored positions inside the forward, so that what the model does after it applies, and the chunk is
cut so that their logits stay within SCORED_ELEMENTS.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from server.logprobs import score

log = logging.getLogger("loraplex.prompt_scores")

# Logits of scored positions made at once (256 MB in fp32; Gemma-3's 262k vocabulary: 256 positions).
SCORED_ELEMENTS = 1 << 26


class HeadTap:
    """The pre-hook on the model's LM head, and what it is asked to do for the next forward: `picked` (flat
    indices over rows x positions) has the head project those positions, as [1, N, hidden]; `kept` keeps those
    positions' hidden states aside (`hidden`) and has the head project each row's last position."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.head = model.get_output_embeddings()
        self.picked: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self._gives_logits: bool | None = None
        if self.head is not None:
            self.head.register_forward_pre_hook(lambda module, args: (self._see(args[0]), *args[1:]))

    def _see(self, hidden: torch.Tensor) -> torch.Tensor:
        # HF slices the last position (logits_to_keep=1) as hidden[:, -1:], a strided view that torch.matmul does
        # not fold into one matmul against a frozen weight: the vocabulary projection ran as a bmm against the
        # weight expanded per row (prefill of 31 rows, vocab 32000: 113 ms instead of ~20). A contiguous copy keeps
        # the int form, which some models' own prefill shortcuts need (Gemma-4).
        if self.kept is not None:
            self.hidden = hidden.flatten(0, 1).index_select(0, self.kept)
            return hidden[:, -1:].contiguous()
        if self.picked is not None:
            return hidden.flatten(0, 1).index_select(0, self.picked)[None]
        return hidden.contiguous()

    @torch.inference_mode()
    def gives_logits(self) -> bool:
        """Whether the model's logits are its head's output (upcast at most): found once, by a forward of two
        tokens (at start, Runner.check_cache; else on the first scoring prefill). A forward that fails says no:
        the scores are then projected inside the forward, which needs nothing of the model."""
        if self._gives_logits is None:
            self._gives_logits = False
            if self.head is not None:
                seen = []
                hook = self.head.register_forward_hook(lambda module, args, out: seen.append(out))
                try:
                    device = next(self.model.parameters()).device
                    out = self.model(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False,
                                     logits_to_keep=0)
                    self._gives_logits = len(seen) == 1 and torch.equal(out.logits.float(), seen[0].float())
                except Exception:
                    log.exception("a forward of two tokens failed: prompt scores will be projected inside the "
                                  "model's forwards")
                finally:
                    hook.remove()
        return self._gives_logits

    def project(self, hidden: torch.Tensor, vocab: int) -> Iterable[torch.Tensor]:
        """The logits [n, V] of final hidden states [N, hidden], in blocks of at most SCORED_ELEMENTS."""
        per = max(1, SCORED_ELEMENTS // vocab)
        for at in range(0, hidden.shape[0], per):
            yield self.head(hidden[at:at + per]).float()


def scored_positions(job, start: int, stop: int) -> tuple[torch.Tensor, dict[int, int], list[int]] | None:
    """The positions of columns [start, stop) of a Prefill `job` whose logits score a prompt token of a
    `job.scores` row: (flat indices over rows x (stop - start) columns, {row: how many of them}, the tokens they
    score), row after row, in column order. A column's logits score the next column's token; a row's first token
    and its last column's logits (its first generated token's) score none."""
    flat, counts, tokens = [], {}, []
    for i in job.scores:
        prompt = job.rows[i].prompt_ids
        first = job.length - len(prompt)
        columns = range(max(start, first), min(stop, job.length - 1))
        if columns:
            flat.extend(job.run_index(i) * (stop - start) + c - start for c in columns)
            counts[i] = len(columns)
            tokens.extend(prompt[c + 1 - first] for c in columns)
    return (torch.tensor(flat, dtype=torch.long), counts, tokens) if flat else None


def keep_scores(job, blocks: Iterable[torch.Tensor], counts: dict[int, int], tokens: list[int]) -> None:
    """Score `tokens` under their positions' logits (`blocks` of [n, V], in order), for the rows in `counts`
    ({row: its positions}, in order), into `job.scores`; rows whose logits were not finite go into `job.broken`
    (they fail, as a row whose next-token logits are not finite does). One copy back for them all."""
    k = max(job.scores[i].k for i in counts)
    wanted = torch.tensor(tokens, device=job.ids.device)
    found, at = [], 0
    for logits in blocks:
        n = logits.shape[0]
        # (finite: as set_aside_non_finite checks a row's next-token logits)
        found.append((*score(logits, wanted[at:at + n], k), logits.sum(dim=-1).isfinite()))
        at += n
        del logits  # before the next block is made: one block's logits alive at a time
    chosen, values, ids, finite = (torch.cat(parts).cpu() for parts in zip(*found))
    at = 0
    for i, n in counts.items():
        job.scores[i].extend(chosen[at:at + n], values[at:at + n], ids[at:at + n])
        if not bool(finite[at:at + n].all()):
            job.broken.add(i)
        at += n

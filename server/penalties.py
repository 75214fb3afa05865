"""What a row's own tokens do to its next-token logits before the choice: HF's repetition penalty (over the prompt
and the output), OpenAI's presence and frequency penalties (over the output), and min_new_tokens' ban on the tokens
that would end the request early. Rows without any cost nothing."""
from __future__ import annotations

import torch

from server.sampling import SamplingParams
from server.stopping import StoppingParams


class TokenHistory:
    """One row's tokens as its penalties need them, kept on the logits' device and brought up to date with each
    token chosen (one indexed write): which tokens the prompt and output hold (repetition penalty), how often each
    was generated (presence and frequency penalties), and how many were generated (the minimum's ban)."""

    def __init__(self, prompt: list[int], sampling: SamplingParams, stopping: StoppingParams,
                 ending: frozenset[int]) -> None:
        self.sampling = sampling
        self.prompt = prompt
        self.min_new_tokens = stopping.min_new_tokens
        self.ending = ending  # the ids that would end the request: banned until the minimum is reached
        self.banned: torch.Tensor | None = None  # of them, those the logits have (a tokenizer may know more)
        self.generated = 0
        self.seen: torch.Tensor | None = None    # [V] bool: in the prompt or the output (repetition penalty)
        self.counts: torch.Tensor | None = None  # [V] fp32: times generated (presence and frequency penalties)

    @classmethod
    def of(cls, prompt: list[int], sampling: SamplingParams, stopping: StoppingParams,
           eos: frozenset[int]) -> TokenHistory | None:
        """The history a request needs, or None when nothing of it depends on its tokens."""
        ending = stopping.stop_token_ids | (frozenset() if stopping.ignore_eos else eos)
        if not sampling.penalized and not (stopping.min_new_tokens and ending):
            return None
        return cls(prompt, sampling, stopping, ending)

    def add(self, token: int) -> None:
        self.generated += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def _allocate(self, vocab: int, device: torch.device) -> None:
        """On the first step: the vocabulary and device are the logits'."""
        p = self.sampling
        self.banned = torch.tensor(sorted(t for t in self.ending if t < vocab), dtype=torch.long, device=device)
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(self.prompt, device=device)] = True
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)


def penalize(logits: torch.Tensor, histories: list[TokenHistory | None]) -> torch.Tensor:
    """`logits` [B, V] with each row's penalties and bans applied, in fp32 (a new tensor), or `logits` itself when
    no row has any. Each row's values depend on its own alone: a row gets the same in any batch."""
    rows = [i for i, h in enumerate(histories) if h is not None]
    if not rows:
        return logits
    vocab, device = logits.shape[-1], logits.device
    out = logits.float().clone()
    for i in rows:
        if histories[i].banned is None:
            histories[i]._allocate(vocab, device)
    repeat = [i for i in rows if histories[i].seen is not None]
    if repeat:  # HF's order: a logit below 0 is multiplied by the penalty, any other divided
        index = torch.tensor(repeat, device=device)
        x = out[index]
        penalty = torch.tensor([[histories[i].sampling.repetition_penalty] for i in repeat], device=device)
        seen = torch.stack([histories[i].seen for i in repeat])
        out[index] = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
    counted = [i for i in rows if histories[i].counts is not None]
    if counted:
        index = torch.tensor(counted, device=device)
        counts = torch.stack([histories[i].counts for i in counted])
        frequency = torch.tensor([[histories[i].sampling.frequency_penalty] for i in counted], device=device)
        presence = torch.tensor([[histories[i].sampling.presence_penalty] for i in counted], device=device)
        out[index] -= counts * frequency + (counts > 0) * presence
    for i in rows:
        if histories[i].generated < histories[i].min_new_tokens:
            out[i, histories[i].banned] = float("-inf")
    return out

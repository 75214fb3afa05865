"""What a row's request and its own tokens do to its next-token logits before the choice: HF's repetition penalty
(over the prompt and the output), OpenAI's presence and frequency penalties (over the output) and logit biases, and
min_new_tokens' ban on the tokens that would end the request early. Rows without any cost nothing; a step with some
costs a few operations over the ids those rows have seen or bias, never a pass over the vocabulary but a copy of the
logits where such a row asks for log-probabilities (dense masks cost 15-25 ms a step at 32 rows x 32000 ids; this,
~1.5 ms: bench/RESULTS.md)."""
from __future__ import annotations

import torch

from server.sampling import SamplingParams
from server.stopping import StoppingParams


class TokenHistory:
    """One row's tokens as its penalties need them, on the logits' device, in buffers sized for the whole request
    (written one id at a time, never reallocated): the distinct ids of its prompt and output (repetition penalty),
    the distinct ids of its output and their counts (presence and frequency penalties), and how many it generated
    (the minimum's ban); and its logit biases. The engine allocates and writes them under inference mode, where it
    chooses tokens: they are inference tensors, to be updated there only."""

    def __init__(self, prompt: list[int], sampling: SamplingParams, stopping: StoppingParams,
                 ending: frozenset[int]) -> None:
        self.sampling = sampling
        self.prompt = prompt
        self.max_new_tokens = stopping.max_new_tokens
        self.min_new_tokens = stopping.min_new_tokens
        self.ending = ending  # the ids that would end the request: banned until the minimum is reached
        self.banned: torch.Tensor | None = None  # of them, those the logits have (a tokenizer may know more)
        self.generated = 0
        self._seen: dict[int, None] | None = None  # distinct ids of prompt and output, in order
        self.seen_ids: torch.Tensor | None = None  # [prompt's distinct + max_new_tokens]: _seen's first len ones
        self._position: dict[int, int] | None = None  # output id -> its index in output_ids
        self.output_ids: torch.Tensor | None = None  # [max_new_tokens]: distinct output ids
        self.output_counts: torch.Tensor | None = None  # [max_new_tokens] fp32: their counts
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, fp32 biases) of sampling.logit_bias

    @classmethod
    def of(cls, prompt: list[int], sampling: SamplingParams, stopping: StoppingParams,
           eos: frozenset[int]) -> TokenHistory | None:
        """The history a request needs, or None when nothing of it depends on its tokens."""
        ending = stopping.stop_token_ids | (frozenset() if stopping.ignore_eos else eos)
        if not sampling.adjusts_logits and not (stopping.min_new_tokens and ending):
            return None
        return cls(prompt, sampling, stopping, ending)

    def allocate(self, vocab: int, device: torch.device) -> None:
        """Before the first step: the vocabulary and device are the logits'."""
        p = self.sampling
        # (a config's eos_token_id may be -1: in the flat index it would ban the row before's last logit)
        self.banned = torch.tensor(sorted(t for t in self.ending if 0 <= t < vocab), dtype=torch.long, device=device)
        if p.repetition_penalty != 1.0:
            self._seen = dict.fromkeys(self.prompt)
            self.seen_ids = torch.empty(len(self._seen) + self.max_new_tokens, dtype=torch.long, device=device)
            self.seen_ids[:len(self._seen)] = torch.tensor(list(self._seen), device=device)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            self._position = {}
            self.output_ids = torch.empty(self.max_new_tokens, dtype=torch.long, device=device)
            self.output_counts = torch.zeros(self.max_new_tokens, dtype=torch.float32, device=device)
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor(values, dtype=torch.float32, device=device))

    def add(self, token: int) -> None:
        self.generated += 1
        if self._seen is not None and token not in self._seen:
            self.seen_ids[len(self._seen)] = token
            self._seen[token] = None
        if self._position is not None:
            at = self._position.get(token)
            if at is None:
                at = self._position[token] = len(self._position)
                self.output_ids[at] = token
            self.output_counts[at] += 1

    @property
    def seen(self) -> torch.Tensor | None:
        """The distinct ids of prompt and output (where a repetition penalty needs them)."""
        return None if self._seen is None else self.seen_ids[:len(self._seen)]

    @property
    def output(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(distinct output ids, their counts) where presence or frequency penalties need them and there are any."""
        n = len(self._position or ())
        return (self.output_ids[:n], self.output_counts[:n]) if n else None


def penalize(logits: torch.Tensor, histories: list[TokenHistory | None], copy: bool = True) -> torch.Tensor:
    """`logits` [B, V] with each row's penalties, biases and bans applied, in fp32 (a new tensor; contiguous fp32
    `logits` themselves where not `copy`: the caller needs no penalized row's own logits after), or `logits` itself
    when no row has any: the biases first (as HF's sequence_bias and vLLM's logit_bias), then HF's repetition
    penalty (a logit below 0 multiplied by it, any other divided), then OpenAI's penalties, then the bans. Each
    row's values depend on its own alone (a row gets the same in any batch); the rows' ids go in one flat index over
    [B x V], so a step costs a few operations whatever the number of rows."""
    rows = [(i, h) for i, h in enumerate(histories) if h is not None]
    if not rows:
        return logits
    out = logits.float() if logits.dtype != torch.float32 else logits.clone() if copy else logits
    out = out.contiguous()  # (a copy keeps the strides of a dense non-contiguous tensor; view(-1) needs none)
    vocab, flat = out.shape[-1], out.view(-1)
    for _, h in rows:
        if h.banned is None:
            h.allocate(vocab, out.device)
    biased = [(i, h.bias) for i, h in rows if h.bias is not None]
    if biased:
        flat.index_add_(0, _flat([(i, ids) for i, (ids, _) in biased], vocab)[0],
                        torch.cat([values for _, (_, values) in biased]))
    repeat = [(i, h) for i, h in rows if h.seen is not None]
    if repeat:
        index, spread = _flat([(i, h.seen) for i, h in repeat], vocab)
        penalty = spread([h.sampling.repetition_penalty for _, h in repeat])
        x = flat[index]
        flat[index] = torch.where(x < 0, x * penalty, x / penalty)
    counted = [(i, h) for i, h in rows if h.output is not None]
    if counted:
        index, spread = _flat([(i, h.output[0]) for i, h in counted], vocab)
        counts = torch.cat([h.output[1] for _, h in counted])
        flat.index_add_(0, index, counts * -spread([h.sampling.frequency_penalty for _, h in counted])
                        - spread([h.sampling.presence_penalty for _, h in counted]))
    banned = [(i, h.banned) for i, h in rows if h.generated < h.min_new_tokens and len(h.banned)]
    if banned:
        flat[_flat(banned, vocab)[0]] = float("-inf")
    return out


def _flat(pieces: list[tuple[int, torch.Tensor]], vocab: int):
    """(the pieces' (row, ids) as one index into the flattened [B x V] logits, a function spreading one value per
    piece over its ids). Their sizes are the host's: nothing is read back from the device (the small host-to-device
    copies of lengths and values still wait for the device on a GPU, as the sampler's parameters do)."""
    ids = [t for _, t in pieces]
    device = ids[0].device
    lengths = torch.tensor([len(t) for t in ids], device=device)
    total = sum(len(t) for t in ids)

    def spread(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device).repeat_interleave(lengths, output_size=total)
    return torch.cat(ids) + spread([row * vocab for row, _ in pieces]), spread

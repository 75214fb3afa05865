"""Next-token choice per row: greedy by default; temperature, top-k and top-p with a per-request seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0            # 0 disables
    top_p: float = 1.0        # 1 disables
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else torch.seed())
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [B, V]. Greedy rows share one argmax; only sampled rows take the per-row path, on their own
    generator, so a seeded request draws the same tokens whatever else is in the batch."""
    choice = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        choice = choice.cpu()
        for i in sampled:
            choice[i] = _sample_row(logits[i].float().cpu(), params[i], generators[i])
    return choice.tolist()


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    # Shift before scaling: the best token stays at 0, so a tiny temperature sends the others to -inf (greedy in
    # the limit) instead of overflowing every logit to +-inf and the softmax to NaN.
    logits = (logits - logits.max()) / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())

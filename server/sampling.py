"""Next-token choice per row: greedy by default; temperature, top-k, top-p and min-p with a per-request seed.
(The penalties and logit biases, which change a row's logits before the choice, are server/penalties.py's.)"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUCLEUS_START = 64  # tokens first searched for a top-p nucleus (a real model's is usually a few); x8 until it fits


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0            # 0 disables
    top_p: float = 1.0        # 1 disables
    seed: int | None = None
    min_p: float = 0.0        # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    presence_penalty: float = 0.0    # 0 disables
    frequency_penalty: float = 0.0   # 0 disables
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids distinct

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the row's logits change before its choice (server/penalties.py)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else torch.seed())
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [B, V]. Greedy rows share one argmax; sampled rows are drawn together, each with one uniform from its
    own generator, by operations that treat every row alone (max, softmax, top-k, cumulative sums: on the CPU a
    row's values are bitwise the same in any batch), so a seeded request draws the same tokens whatever else is in
    the batch. On a GPU a cumulative sum's kernel depends on the number of rows, so a draw can move at a last-bit
    boundary, as the logits themselves can there."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):  # no argmax nor copy of the rows to spend (a third of a step's sampling)
        return _draw(logits.float(), params, generators).tolist()
    choice = logits.argmax(dim=-1)
    if rows:
        index = torch.tensor(rows, device=logits.device)
        choice[index] = _draw(logits[index].float(), [params[i] for i in rows], [generators[i] for i in rows])
    return choice.tolist()


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` [S, V] (fp32), by inverse transform sampling of its filtered distribution."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    # Shift before scaling: the best token stays at 0, so a tiny temperature sends the others to -inf (greedy in
    # the limit) instead of overflowing every logit to +-inf and the softmax to NaN.
    x = (logits - logits.amax(-1, keepdim=True)) / temperature
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        best = x.topk(max(ks), dim=-1).values  # sorted, best first
        kth = best.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None])
        kth[torch.tensor([k == 0 for k in ks], device=device)] = float("-inf")  # rows without top-k keep all
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if any(p.top_p < 1.0 for p in params):
        probs = probs.masked_fill(probs < _nucleus_bar(probs, torch.tensor([[p.top_p] for p in params],
                                                                            device=device)), 0.0)
    if any(p.min_p > 0.0 for p in params):  # after top-k and top-p, as HF; the likeliest token always stays
        min_p = torch.tensor([[p.min_p] for p in params], device=device)
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    u = torch.tensor([[torch.rand((), dtype=torch.float64, generator=g).item()] for g in generators],
                     dtype=torch.float32)
    chosen = _invert(probs, u.to(device))
    # A GPU's parallel scan can round a zero's running sum off its predecessor's, and so draw a token top-k or top-p
    # left out: such a row is drawn again on the host, whose sums run in order (one gather: checked everywhere).
    wrong = (probs.gather(1, chosen[:, None])[:, 0] == 0).nonzero()[:, 0]
    if len(wrong):
        chosen[wrong] = _invert(probs[wrong].cpu(), u[wrong.cpu()]).to(device)
    return chosen


def _invert(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative mass exceeds u x the row's total (unnormalised where top-p left
    tokens out): never one of probability 0, whose running sum equals its predecessor's (the CPU adds each row in
    order), and never past the end, as u x total stays below the total. In float32, as the probabilities: a
    token's share is drawn to within float32's step of the running sum (6e-8 of the total; float64 cost 3.5 ms more
    for 32 rows x 32000)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def _nucleus_bar(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[S, 1]: per row, the probability of the last token of its nucleus (tokens at or above it are kept): the
    most likely tokens until the mass before the next reaches top_p (the best token always stays; tokens tied
    with the last one stay too); 0 where top_p is 1. Only the best tokens are sorted: first NUCLEUS_START, more
    (x8) for the rows whose mass has not reached their top_p, so a wide nucleus costs its own row a long sort,
    not the whole batch."""
    vocab = probs.shape[-1]
    bar = torch.zeros_like(top_p)
    rows = (top_p[:, 0] < 1.0).nonzero()[:, 0]
    k = min(NUCLEUS_START, vocab)
    while len(rows):
        best = (probs if len(rows) == len(probs) else probs[rows]).topk(k, dim=-1).values
        mass = best.cumsum(-1)  # on the CPU a position's mass is the same whatever k and rows (so is the cut)
        p = top_p[rows]
        done = (mass[:, -1:] >= p)[:, 0] | (k == vocab)
        kept = 1 + (mass[:, :-1] < p).sum(-1, keepdim=True)  # tokens whose mass before them is below top_p
        bar[rows[done]] = best.gather(1, kept - 1)[done]
        rows, k = rows[~done], min(8 * k, vocab)
    return bar

"""Log-probabilities of the generated tokens, for the rows whose requests ask for them (GenerateRequest.logprobs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives a request may ask for at each step (as OpenAI's API allows)


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


def token_logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[TokenLogprobs | None]:
    """Per row of `logits` [B, V]: None where `wanted` is None, else the chosen token's log-probability and the
    `wanted` most likely tokens' (all V, in a smaller vocabulary) under the row's own distribution (fp32
    log-softmax of its logits, before temperature, top-k and top-p). Rows that want none cost nothing; the rest,
    one log-sum-exp and one top-k."""
    rows = [i for i, n in enumerate(wanted) if n is not None]
    found: list[TokenLogprobs | None] = [None] * len(wanted)
    if not rows:
        return found
    # one copy to the device and two back (a GPU waits for each)
    index = torch.tensor([rows, [tokens[i] for i in rows]], device=logits.device)
    x = (logits if len(rows) == len(wanted) else logits[index[0]]).float()  # (every row's: no [rows, V] copy)
    total = torch.logsumexp(x, dim=-1, keepdim=True)  # log p = logit - this: no [rows, V] log-softmax written
    top = x.topk(min(max(wanted[i] for i in rows), x.shape[-1]), dim=-1)  # (a toy's vocabulary may be smaller)
    values = (torch.cat([x.gather(1, index[1][:, None]), top.values], dim=1) - total).tolist()
    ids = top.indices.tolist()
    for j, i in enumerate(rows):
        n = wanted[i]
        found[i] = TokenLogprobs(values[j][0], ids[j][:n], values[j][1:n + 1])
    return found

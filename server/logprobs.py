"""Log-probabilities of the generated tokens, for the rows whose requests ask for them (GenerateRequest.logprobs)."""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives a request may ask for at each step (as OpenAI's API allows)


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class PromptLogprobs:
    """A prompt's tokens' log-probabilities (GenerateRequest.prompt_logprobs), packed as 4-byte values: a long
    prompt's TokenLogprobs objects took 1.6 KB a token with 20 alternatives, held until the request ends.
    `logprobs[i]` is token i + 1's; `top_ids` and `top_logprobs` hold `k` values a token, token after token."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.logprobs, self.top_ids, self.top_logprobs = array("f"), array("i"), array("f")

    def __len__(self) -> int:
        return len(self.logprobs)

    def extend(self, chosen: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor) -> None:
        """Append tokens' scores: [n] log-probabilities, [n, >= k] likeliest values and ids (host tensors)."""
        self.logprobs.frombytes(chosen.float().numpy().tobytes())
        self.top_logprobs.frombytes(top_values[:, :self.k].float().contiguous().numpy().tobytes())
        self.top_ids.frombytes(top_ids[:, :self.k].int().contiguous().numpy().tobytes())

    def entries(self):
        """Each token's TokenLogprobs, made one at a time."""
        k = self.k
        for i, value in enumerate(self.logprobs):
            yield TokenLogprobs(value, self.top_ids[i * k:(i + 1) * k].tolist(),
                                self.top_logprobs[i * k:(i + 1) * k].tolist())


def score(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of logits [N, V] (fp32 log-softmax, no [N, V] of it written): each row's token's log-probability [N], and
    the k likeliest tokens' [N, k] (all V, in a smaller vocabulary) and their ids [N, k]."""
    x = logits.float()
    total = torch.logsumexp(x, dim=-1, keepdim=True)
    top = x.topk(min(k, x.shape[-1]), dim=-1)
    return (x.gather(1, tokens[:, None]) - total)[:, 0], top.values - total, top.indices


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
    x = logits if len(rows) == len(wanted) else logits[index[0]]  # (every row's: no [rows, V] copy)
    chosen, top_values, top_ids = score(x, index[1], max(wanted[i] for i in rows))
    values = torch.cat([chosen[:, None], top_values], dim=1).tolist()
    ids = top_ids.tolist()
    for j, i in enumerate(rows):
        n = wanted[i]
        found[i] = TokenLogprobs(values[j][0], ids[j][:n], values[j][1:n + 1])
    return found

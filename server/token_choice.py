"""A step's token choice for its rows: their penalties and response formats, the draw, and the log-probabilities they
ask for."""
from __future__ import annotations

import torch

from server.errors import InternalError
from server.format_masks import allowed, apply_masks, take
from server.logprobs import token_logprobs
from server.penalties import penalize
from server.sampling import sample


def not_finite() -> InternalError:
    return InternalError("the model's logits for this request were not finite (NaN or Inf); the other requests in "
                         "its batch were not affected")


def set_aside_non_finite(logits):
    """(logits safe to sample, indices of rows whose logits hold NaN or Inf): an fp16 overflow in one row must fail
    that request alone, not sample garbage for it (argmax of NaN) nor fail its batch (multinomial raises)."""
    totals = logits.sum(dim=-1)  # NaN/Inf anywhere in a row reach its sum: one pass, 0.05 ms for 32 x 32000 on CPU
    if bool(totals.isfinite().all()):  # (an elementwise isfinite took 1.4 ms, 4% of a decode step)
        return logits, frozenset()
    bad = (~totals.isfinite()).nonzero().flatten().tolist()
    logits = logits.clone()
    logits[bad] = 0.0
    return logits, frozenset(bad)


@torch.inference_mode()  # as the forward that made `logits` (inference tensors: penalized in place)
def choose(logits, states: list) -> tuple[list[int], list, dict[int, Exception]]:
    """Each row's next token from `logits` [rows, V] (after its penalties and within its response format), the
    log-probabilities it asks for (of the model's own logits), and the rows that failed at this token, with why
    (logits not finite, a format that could not be followed). `states`: the rows' engine states (their request,
    generator and token history)."""
    matchers = [s.request.matcher for s in states]
    formatted = [i for i, m in enumerate(matchers) if m is not None]
    # asked first: on a GPU the host asks the matchers before anything waits for the logits (the check below does)
    bits, failed = allowed(matchers, logits.shape[-1]) if formatted else (None, {})
    logits, broken = set_aside_non_finite(logits)
    failed |= {i: not_finite() for i in broken}
    # adjusted in place (a [B, V] copy saved) unless a row with a history (penalties, biases or a min_new_tokens
    # ban) or a format asks for log-probabilities, which are of its own logits
    copy = any((s.history is not None or s.request.matcher is not None) and s.request.logprobs is not None
               for s in states)
    adjusted = penalize(logits, [s.history for s in states], copy)
    if formatted:
        if adjusted is logits and copy:
            adjusted = logits.clone()
        apply_masks(adjusted, formatted, bits)
    tokens = sample(adjusted, [s.request.sampling for s in states], [s.generator for s in states])
    for state, token in zip(states, tokens):
        if state.history is not None:
            state.history.add(token)
    if formatted:
        take(matchers, tokens, bits, failed)
    return tokens, token_logprobs(logits, tokens, [s.request.logprobs for s in states]), failed

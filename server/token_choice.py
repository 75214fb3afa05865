"""A step's token choice for its rows: their penalties and response formats, the draw, and the log-probabilities they
ask for."""
from __future__ import annotations

import torch

from server.errors import InternalError, InvalidArgument
from server.logprobs import token_logprobs
from server.penalties import penalize
from server.sampling import sample


NEG_INF_BITS = -0x800000  # 0xFF800000 as an int32: float32's -inf


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


def mask_to_formats(logits: torch.Tensor, matchers: list) -> dict[int, Exception]:
    """Rows with a response_format (their matcher; None for the others): every token that cannot continue their
    output set to -inf in `logits` [rows, V], in place. Returns the rows whose matcher failed (a step beyond its
    grammar's limits), to be failed: their mask would leave only the end of the sequence, an output cut silently."""
    rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bits = torch.empty(len(rows), words, dtype=torch.int32)  # token t is bit t % 32 of word t // 32
    for k, (_, matcher) in enumerate(rows):
        matcher.unsafe_compute_mask_ptr(bits[k].data_ptr(), words * 4)  # (drops the GIL)
    failed = {i: InvalidArgument(f"response_format could not be followed: {m.stop_reason()} (a step of its grammar "
                                 f"went beyond llguidance's limits; a simpler format may pass)")
              for i, m in rows if m.is_error()}
    # each token's bit made its logit's bias, 0.0 or -inf (bit - 1 is 0 or all ones, masked to -inf's bits), without
    # a branch per token: masked_fill_ with such a mask took ~4 ms for 32 rows x 32000 on 2 CPU cores, this ~0.4
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = bits.to(logits.device)
    bias = ((((words[:, :, None] >> shifts) & 1) - 1) & NEG_INF_BITS).view(len(rows), -1)[:, :vocab]
    bias = bias.view(torch.float32).to(logits.dtype)
    if len(rows) == len(matchers):
        logits.add_(bias)
    else:
        logits.index_add_(0, torch.tensor([i for i, _ in rows], device=logits.device), bias)
    return failed


@torch.inference_mode()  # as the forward that made `logits` (inference tensors: penalized in place)
def choose(logits, states: list) -> tuple[list[int], list, dict[int, Exception]]:
    """Each row's next token from `logits` [rows, V] (after its penalties and within its response format), the
    log-probabilities it asks for (of the model's own logits), and the rows that failed at this token, with why
    (logits not finite, a format that could not be followed). `states`: the rows' engine states (their request,
    generator and token history)."""
    logits, broken = set_aside_non_finite(logits)
    matchers = [s.request.matcher for s in states]
    # adjusted in place (a [B, V] copy saved) unless a row with a history (penalties, biases or a min_new_tokens
    # ban) or a format asks for log-probabilities, which are of its own logits
    copy = any((s.history is not None or s.request.matcher is not None) and s.request.logprobs is not None
               for s in states)
    adjusted = penalize(logits, [s.history for s in states], copy)
    failed = {i: not_finite() for i in broken}
    if any(m is not None for m in matchers):
        if adjusted is logits and copy:
            adjusted = logits.clone()
        failed = mask_to_formats(adjusted, matchers) | failed
    tokens = sample(adjusted, [s.request.sampling for s in states], [s.generator for s in states])
    for i, (state, token) in enumerate(zip(states, tokens)):
        if state.history is not None:
            state.history.add(token)
        if matchers[i] is not None and i not in failed and not matchers[i].consume_token(token):
            failed[i] = InternalError(f"token {token} was chosen outside the request's response_format")
    return tokens, token_logprobs(logits, tokens, [s.request.logprobs for s in states]), failed

"""A step's formatted rows (GenerateRequest.response_format): which tokens each may take, asked of its llguidance
matcher, made a bias on its logits; then each row's chosen token given to its matcher."""
from __future__ import annotations

import time

import torch

from server.errors import InternalError, InvalidArgument

NEG_INF_BITS = -0x800000  # 0xFF800000 as an int32: float32's -inf
# CPU time a row's mask may take at a step (ordinary formats: 0.01-0.4 ms on a 32000-token vocabulary; a row over it
# fails, INVALID_ARGUMENT, at the first such step: it would slow every row of the batch at every step)
MAX_MASK_CPU = 0.02


def allowed(matchers: list, vocab: int) -> tuple[torch.Tensor, dict[int, Exception]]:
    """What the formatted rows (their matchers; None for free rows) may take next: ([formatted rows, vocab/32] int32
    words on the host, token t's bit t % 32 of word t // 32; the rows that fail: their matcher failed (a step beyond
    its grammar's limits, whose mask would leave only the end of the sequence, an output cut silently) or took more
    than MAX_MASK_CPU). Host work only: on a GPU it runs while the forward that makes the logits does. The masks are
    asked for one by one, on the engine thread: llguidance's LLExecutor computes them together on threads of its
    own, and on 2 cores those threads cost the forward after them more than they saved (bench/RESULTS.md)."""
    rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
    words = (vocab + 31) // 32
    bits = torch.empty(len(rows), words, dtype=torch.int32)
    failed: dict[int, Exception] = {}
    for k, (i, matcher) in enumerate(rows):
        cpu = time.thread_time()  # (this thread's: not the time it waits for the GIL or a core)
        matcher.unsafe_compute_mask_ptr(bits[k].data_ptr(), words * 4)  # (drops the GIL)
        cpu = time.thread_time() - cpu
        if matcher.is_error():
            failed[i] = _unfollowed(matcher)
        elif cpu > MAX_MASK_CPU:
            failed[i] = InvalidArgument(f"response_format {too_costly(cpu, MAX_MASK_CPU, 'a token')}")
    return bits, failed


def take(matchers: list, tokens: list[int], bits: torch.Tensor, failed: dict[int, Exception]) -> None:
    """Each formatted row's chosen token to its matcher (`bits`: `allowed`'s); rows it fails go into `failed`."""
    for k, i in enumerate(i for i, m in enumerate(matchers) if m is not None):
        token = tokens[i]
        if i in failed or matchers[i].consume_token(token):
            continue
        if (int(bits[k, token // 32]) >> (token % 32)) & 1:  # allowed, but the step after it went too far
            failed[i] = _unfollowed(matchers[i])
        else:
            failed[i] = InternalError(f"token {token} was chosen outside the request's response_format")


def apply_masks(logits: torch.Tensor, rows: list[int], bits: torch.Tensor) -> None:
    """`logits[rows[k]]` gets -inf where bit t of `bits[k]` is 0, in place. Each bit is made its logit's bias, 0.0
    or -inf (bit - 1 is 0 or all ones, masked to -inf's bits), without a branch per token: masked_fill_ with such a
    mask took ~4 ms for 32 rows x 32000 on 2 CPU cores, this ~1."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = bits.to(logits.device)
    bias = ((((words[:, :, None] >> shifts) & 1) - 1) & NEG_INF_BITS).view(len(rows), -1)[:, :vocab]
    bias = bias.view(torch.float32).to(logits.dtype)
    if len(rows) == len(logits):
        logits.add_(bias)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)


def _unfollowed(matcher) -> InvalidArgument:
    return InvalidArgument(f"response_format {why_stopped(matcher)}")


def why_stopped(matcher) -> str:
    """Why a matcher in its error state stopped, after "response_format": nothing can continue its output (a format
    no text satisfies, "[^\\s\\S]"), or llguidance's reason."""
    if matcher.stop_reason().startswith("NoExtension") or matcher.get_error().startswith("NoExtension"):
        return "allows no token here, and the output is not complete: no text can satisfy the format from this point"
    return (f"could not be followed: {llguidance_message(matcher.get_error(), 300)} (a step of its grammar went "
            f"beyond llguidance's limits; a simpler format may pass)")


def too_costly(cpu: float, limit: float, token: str) -> str:
    """Why a format is refused whose mask for `token` took `cpu` seconds of CPU, over `limit`, after
    "response_format"."""
    return (f"took {cpu * 1e3:.0f} ms of CPU to decide {token}, more than {limit * 1e3:.0f}: too costly to follow "
            f"(every token of it would hold up the whole batch)")


def llguidance_message(error: str, limit: int = 1000) -> str:
    """llguidance's message for a status: without its blank lines and its "<non-verbose/>" marker (where the
    parser's state would be), bounded (a grammar's error quotes the grammar's line)."""
    text = "\n".join(line for line in error.splitlines() if line.strip() and line.strip() != "<non-verbose/>")
    return text if len(text) <= limit else text[:limit] + "..."

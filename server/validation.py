"""Generate requests' fields checked and turned into engine types: sampling, stopping, the prompt's tokens.
Every refusal names the field or the flag it breaks (INVALID_ARGUMENT), or the model limit (OUT_OF_RANGE)."""
from __future__ import annotations

import math
import struct
from dataclasses import replace

from protos.loraplex.v1 import inference_pb2 as pb
from server.chat import chat_ids
from server.errors import FailedPrecondition, InvalidArgument, OutOfRange
from server.logprobs import MAX_LOGPROBS
from server.sampling import SamplingParams
from server.stopping import StoppingParams

MAX_STOP_SEQUENCES, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS, MAX_REQUEST_ID, MAX_CACHE_SALT = 16, 256, 64, 256, 256
REPETITION_PENALTY = (0.01, 100.0)
MAX_LOGIT_BIAS, LOGIT_BIAS = 300, 100.0  # as OpenAI's API


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return value


def sampling_from(msg: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    temperature = _finite(msg.temperature, "sampling.temperature") if msg.HasField("temperature") else 0.0
    if temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be >= 0 (0 = greedy), got {temperature}")
    top_k = msg.top_k if msg.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument(f"sampling.top_k must be >= 0 (0 disables), got {top_k}")
    top_p = _finite(msg.top_p, "sampling.top_p") if msg.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p}")
    min_p = _within(msg, "min_p", 0.0, 0.0, 1.0)
    # Bounded so that no float32 logit a model makes can overflow when divided or multiplied by it (1e-40 turned
    # logits to inf, and the row's NaN draw failed its whole batch)
    repetition = _within(msg, "repetition_penalty", 1.0, *REPETITION_PENALTY)
    return SamplingParams(temperature, top_k, top_p, msg.seed if msg.HasField("seed") else None, min_p, repetition,
                          _within(msg, "presence_penalty", 0.0, -2.0, 2.0),
                          _within(msg, "frequency_penalty", 0.0, -2.0, 2.0), _logit_bias(msg, vocab_size))


def _logit_bias(msg: pb.SamplingParams, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = msg.logit_bias
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"sampling.logit_bias takes at most {MAX_LOGIT_BIAS} token ids, got {len(bias)}")
    for token, value in sorted(bias.items()):
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"sampling.logit_bias names token id {token}, outside the vocabulary "
                                  f"[0, {vocab_size})")
        if not -LOGIT_BIAS <= _finite(value, f"sampling.logit_bias[{token}]") <= LOGIT_BIAS:
            raise InvalidArgument(f"sampling.logit_bias[{token}] must be in [-{LOGIT_BIAS:g}, {LOGIT_BIAS:g}], got "
                                  f"{value:.9g}")  # (a float32: 100.00001 arrives as 100.00000762939453)
    return tuple(sorted((token, value) for token, value in bias.items() if value != 0.0))


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _within(msg: pb.SamplingParams, name: str, unset: float, low: float, high: float) -> float:
    if not msg.HasField(name):
        return unset
    value = _finite(getattr(msg, name), f"sampling.{name}")
    if not _float32(low) <= value <= _float32(high):  # the field is a float32: 0.01 arrives as 0.0099999998
        raise InvalidArgument(f"sampling.{name} must be in [{low:g}, {high:g}] ({unset:g} disables), got {value}")
    return value


def logprobs_from(request: pb.GenerateRequest, name: str = "logprobs") -> int | None:
    """GenerateRequest.logprobs or .prompt_logprobs: None when unset, else the alternatives wanted per token."""
    if not request.HasField(name):
        return None
    n = getattr(request, name)
    if n > MAX_LOGPROBS:
        raise InvalidArgument(f"{name} must be at most {MAX_LOGPROBS} (the most likely tokens returned at each "
                              f"position beside the {'prompt' if name == 'prompt_logprobs' else 'chosen'} one; 0 "
                              f"returns its log-probability only), got {n}")
    return n


def stopping_from(msg: pb.StoppingCriteria, limits, skipped, vocab_size: int) -> StoppingParams:
    """`skipped`: the model's SkippedTokens (base.skipped_tokens)."""
    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else limits.default_max_new_tokens
    if max_new < 1:
        raise InvalidArgument(f"stopping.max_new_tokens must be >= 1, got {max_new}")
    if max_new > limits.max_new_tokens and limits.max_new_tokens < limits.max_context:  # a flag set below the model's
        raise InvalidArgument(f"stopping.max_new_tokens {max_new} is above the server's --max-new-tokens "
                              f"{limits.max_new_tokens}")
    if max_new > limits.max_context:
        raise OutOfRange(f"stopping.max_new_tokens {max_new} exceeds the model context of {limits.max_context} "
                         f"tokens")
    stops = tuple(msg.stop)
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        raise InvalidArgument(f"stopping.stop takes at most {MAX_STOP_SEQUENCES} non-empty strings of at most "
                              f"{MAX_STOP_LENGTH} characters")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"stopping.stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got "
                              f"{len(msg.stop_token_ids)}")
    bad = [t for t in msg.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"stopping.stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab_size})")
    if msg.min_new_tokens < 0:
        raise InvalidArgument(f"stopping.min_new_tokens must be >= 0, got {msg.min_new_tokens}")
    return StoppingParams(max_new, stops, msg.ignore_eos, _stop_tokens(stops, skipped) | frozenset(msg.stop_token_ids),
                          msg.min_new_tokens)


def _stop_tokens(stops: tuple[str, ...], skipped) -> frozenset[int]:
    """The tokens whose generation stops the row: those of the stops that are exactly the text of a token decoding
    leaves out of the text (`skipped`: loader.special_tokens.SkippedTokens), e.g. ChatML's <|im_end|> where it is no
    end-of-sequence id. Stops are matched against the decoded text, which never holds such a token's text; so a stop
    that holds one beside other text could never match it, and is refused."""
    ids: set[int] = set()
    for stop in stops:
        if stop in skipped.ids:
            ids |= skipped.ids[stop]
            continue
        inside = skipped.found_in(stop)
        if inside is not None:
            raise InvalidArgument(
                f"stopping.stop {stop!r} holds {inside!r}, the text of a special token (id "
                f"{min(skipped.ids[inside])}) that is left out of the generated text: this stop would match only those "
                f"characters spelled out by ordinary tokens, never the special token itself; send {inside!r} as a "
                f"stop sequence of its own (a stop that is exactly a special token's text stops when that token is "
                f"generated)")
    return frozenset(ids)


def _check_prompt_chars(chars: int, base, limits, what: str = "the prompt has") -> None:
    """A prompt text that cannot fit whatever it encodes to: at most base.max_token_chars characters a token (None:
    this tokenizer gives no such bound)."""
    per_token = base.max_token_chars
    if per_token is not None:
        _check_fits(chars, per_token, f"{what} {chars} characters",
                    f"a token stands for at most {per_token} characters", base, limits)


def _check_fits(amount: int, per_token: int, what: str, why: str, base, limits) -> None:
    """Refuse `what` (an amount of something, at most `per_token` of it a token) that no prompt can hold."""
    if amount > limits.max_prompt_tokens * per_token and limits.max_prompt_tokens < base.max_context:
        raise InvalidArgument(f"{what}, more than the server's --max-prompt-tokens {limits.max_prompt_tokens} can "
                              f"hold ({why})")
    if amount > base.max_context * per_token:
        raise OutOfRange(f"{what}, more than the model context of {base.max_context} tokens can hold ({why})")


def _check_tokenized(ids: list[int], prompt: str, base) -> None:
    """A text prompt's ids, as the tokenizer made them, within the model's vocabulary (base.vocab_size, as
    prompt_token_ids are checked): a tokenizer may know tokens the model has no embedding row for (a [PAD] added
    without resizing the embeddings), and one such id failed the whole prefill step it ran in, with INTERNAL."""
    if max(ids) < base.vocab_size:
        return
    bad = next(t for t in ids if t >= base.vocab_size)
    text = base.tokenizer.decode([bad])
    advice = ("leave that text out of the prompt" if text and text in prompt else
              "the tokenizer adds it by itself, so send the prompt as prompt_token_ids")
    raise InvalidArgument(f"the prompt tokenizes to the token {text!r} (id {bad}), which the tokenizer knows but the "
                          f"model does not: its vocabulary has {base.vocab_size} tokens (ids 0-{base.vocab_size - 1}); "
                          f"{advice}")


def _fit_prompt(tokens: int, stopping: StoppingParams, explicit: bool, base, limits) -> StoppingParams:
    """The stopping a prompt of `tokens` tokens runs with. A request that sets no max_new_tokens gets the server's
    default within the room its prompt leaves in the context; one that sets it gets exactly that or an error."""
    # A flag set below the model's own limit first, naming the flag; by default --max-prompt-tokens is the context,
    # and a prompt beyond it is the model's limit (OUT_OF_RANGE), not a flag the user never set.
    if tokens > limits.max_prompt_tokens and limits.max_prompt_tokens < base.max_context:
        raise InvalidArgument(f"the prompt has {tokens} tokens, above the server's --max-prompt-tokens "
                              f"{limits.max_prompt_tokens}")
    if tokens >= base.max_context:
        raise OutOfRange(f"the prompt has {tokens} tokens and the model context is {base.max_context}: no room is "
                         f"left for a new token")
    if not explicit:
        room = min(base.max_context, limits.max_kv_tokens) - tokens
        stopping = replace(stopping, max_new_tokens=max(1, min(stopping.max_new_tokens, room)))
    if tokens + stopping.max_new_tokens > base.max_context:
        raise OutOfRange(f"prompt ({tokens} tokens) + max_new_tokens ({stopping.max_new_tokens}) exceeds the "
                         f"model context of {base.max_context} tokens")
    if tokens + stopping.max_new_tokens > limits.max_kv_tokens:  # permanent, unlike a full queue
        raise OutOfRange(f"prompt ({tokens} tokens) + max_new_tokens ({stopping.max_new_tokens}) needs more "
                         f"KV-cache token slots than the server's --max-kv-tokens {limits.max_kv_tokens}"
                         f"{' (what its free memory held at start)' if limits.kv_by_memory else ''}, even alone")
    return stopping


def prompt_and_stopping(request: pb.GenerateRequest, base, limits) -> tuple[list[int], StoppingParams]:
    """The prompt's token ids and the stopping it runs with (tokenizing a text prompt: blocking work)."""
    stopping = stopping_from(request.stopping, limits, base.skipped_tokens, base.vocab_size)
    explicit = request.stopping.HasField("max_new_tokens")
    ids, stopping = _prompt_and_fit(request, stopping, explicit, base, limits)
    if stopping.min_new_tokens > stopping.max_new_tokens:
        runs = "asks for" if explicit else "runs with (the server's default within the room the prompt leaves)"
        raise InvalidArgument(f"stopping.min_new_tokens {stopping.min_new_tokens} is above the max_new_tokens "
                              f"{stopping.max_new_tokens} the request {runs}")
    return ids, stopping


def _chat_prompt(chat: pb.Chat, base, limits) -> list[int]:
    """A chat's prompt ids, its size checked before it is rendered (a million empty messages took 29 s and 2 GB)."""
    messages = chat.messages
    _check_fits(len(messages), 1, f"the chat has {len(messages)} messages",
                "a chat template writes every message as a token at least", base, limits)
    _check_prompt_chars(sum(len(m.role) + len(m.content) for m in messages), base, limits,
                        "the chat's roles and contents have")
    ids = chat_ids(chat, base.tokenizer)
    text = "".join(m.content for m in messages)
    bad = next((t for t in ids if t >= base.vocab_size), None)
    spelled = None if bad is None else base.tokenizer.decode([bad])
    # the template's, not the user's: a message's text never becomes a special token (sanitized), and other tokens
    # the template writes are not in the messages' text
    if bad is not None and (bad in base.tokenizer.all_special_ids or spelled not in text):
        raise FailedPrecondition(f"the model's chat template writes {spelled!r} (id {bad}), a token the tokenizer "
                                 f"knows but the model does not (its vocabulary has {base.vocab_size} tokens): send "
                                 f"the prompt as text or token ids")
    _check_tokenized(ids, text, base)
    return ids


def _prompt_and_fit(request: pb.GenerateRequest, stopping: StoppingParams, explicit: bool, base,
                    limits) -> tuple[list[int], StoppingParams]:
    which = request.WhichOneof("input")
    if which == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt is empty")
        _check_prompt_chars(len(request.prompt), base, limits)  # before tokenizing: its memory grows with it
        ids = base.tokenizer(request.prompt).input_ids
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens")
        _check_tokenized(ids, request.prompt, base)
        return ids, _fit_prompt(len(ids), stopping, explicit, base, limits)
    if which == "chat":
        ids = _chat_prompt(request.chat, base, limits)
        return ids, _fit_prompt(len(ids), stopping, explicit, base, limits)
    if which == "prompt_token_ids":
        if not request.prompt_token_ids.ids:
            raise InvalidArgument("prompt_token_ids is empty")
        stopping = _fit_prompt(len(request.prompt_token_ids.ids), stopping, explicit, base, limits)  # before copying
        ids = list(request.prompt_token_ids.ids)
        bad = [t for t in ids if not 0 <= t < base.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt_token_ids holds {bad[0]}, outside the vocabulary [0, {base.vocab_size})")
        return ids, stopping
    raise InvalidArgument("set one of prompt, prompt_token_ids or chat")

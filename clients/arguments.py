"""What the Python clients check before anything is sent: the request, the token and the deadline."""
from __future__ import annotations

import numbers
from typing import Sequence

from protos.loraplex.v1 import inference_pb2 as pb

MAX_TIMEOUT = 1e9  # seconds (31 years): grpc's deadline overflows near 9.2e9 s, and every call then fails at once


def build_request(prompt: str | Sequence[int], adapter_id: str = "", *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: str | Sequence[str] = (), ignore_eos: bool = False,
                  request_id: str = "") -> pb.GenerateRequest:
    """A text prompt or a sequence of token ids; unset sampling fields mean greedy decoding. `stop`: one stop
    string or several (a string is one stop sequence, not one per character). `adapter_id` "" is the base model;
    None is refused (protobuf would send it as "": an unset variable would silently serve the base model)."""
    if adapter_id is None:  # protobuf would send "", the base model: a classic unset environment variable
        raise TypeError('adapter_id is None (an unset variable?): pass "" for the base model')
    if isinstance(prompt, (bytes, bytearray)):  # a sequence of ints, but surely meant as text
        raise TypeError("prompt must be text (str) or token ids (a sequence of int), not bytes: decode it first")
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    stops = [stop] if isinstance(stop, str) else list(stop)
    stopping = pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop=stops, ignore_eos=ignore_eos)
    request = pb.GenerateRequest(adapter_id=adapter_id, sampling=sampling, stopping=stopping, request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


def check_token(token: str | None, source: str = "token") -> str | None:
    """`token` if it can be sent: it goes in the `authorization` header, so printable ASCII without spaces. A token
    that cannot is a ValueError naming `source` (where it came from) at once, not INTERNAL "Invalid metadata"
    (sync) or a grpc ExecuteBatchError that is no RpcError (asyncio) at the first call. The token is never shown."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"{source} must be a str, not {type(token).__name__}")
    for position, char in enumerate(token, 1):
        if not "!" <= char <= "~":
            what = ("whitespace" if char.isspace() else "a non-ASCII character" if ord(char) > 127
                    else "a control character")
            raise ValueError(f"{source}: a token must be printable ASCII without spaces (it is sent as a header "
                             f"value): character {position} of {len(token)} is {what}")
    return token


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """A deadline in seconds for each call: a number > 0 and <= MAX_TIMEOUT, or None for no deadline. Zero, a
    negative, NaN or too large a number was accepted, and every call then failed at once with DEADLINE_EXCEEDED,
    never sent."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, or None for no deadline, not {type(timeout).__name__}")
    if not 0 < timeout <= MAX_TIMEOUT:  # NaN fails this too
        raise ValueError(f"{name} must be a number of seconds > 0 and <= {MAX_TIMEOUT:,.0f}, or None for no deadline: "
                         f"got {timeout}")
    return float(timeout)

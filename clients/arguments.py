"""What the Python clients check before anything is sent: the request's fields, the token and the deadline.

Types and what a protobuf field can carry are checked here, with the argument named (protobuf's own messages, such
as "bad argument type for built-in operation", name nothing); what a value means (a negative temperature, an
unknown adapter) is the server's to say, with its status code."""
from __future__ import annotations

import json
import numbers
from typing import Mapping, Sequence

from protos.loraplex.v1 import inference_pb2 as pb

INT32 = (-2 ** 31, 2 ** 31)
MAX_TIMEOUT = 1e9  # seconds (31 years): grpc's deadline overflows near 9.2e9 s, and every call then fails at once


def check_text(name: str, value) -> str:
    """A str that protobuf can encode: text decoded with surrogateescape (argv, os.listdir of bytes that are not
    UTF-8) holds lone surrogates, which it cannot."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} is not valid UTF-8: character {err.start + 1} is a lone surrogate "
                         f"(U+{ord(value[err.start]):04X}; bytes decoded with surrogateescape?)") from None
    return value


MAX_TOKEN_CHARS = 4096  # grpc refuses metadata past 8 KiB at random, and past 16 KiB always


def check_flag(name: str, value, optional: bool = False) -> bool | None:
    """True or False (None too where `optional`; numpy's bool too): a string such as "no" would be true."""
    if value is None and optional:
        return None
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, not {type(value).__name__}")
    return value


def check_integer(name: str, value, low: int, high: int) -> int | None:
    """None (an optional field left unset), or `integer`."""
    return None if value is None else integer(name, value, low, high)


def integer(name: str, value, low: int, high: int) -> int:
    """An int with low <= value < high: what the field can carry (the server checks what it means)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{_power(low)}, {_power(high)}), what the request can carry: got {value}")
    return int(value)


def _power(bound: int) -> str:
    return {2 ** 64: "2^64", 2 ** 31: "2^31", -2 ** 31: "-2^31"}.get(bound, str(bound))


def check_number(name: str, value) -> float | None:
    """None (an optional field left unset), or `number`."""
    return None if value is None else number(name, value)


def number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond a double's range (10**400)
        raise ValueError(f"{name} must be within a double's range (about 1.8e308 either way): got an int of "
                         f"{int(value).bit_length()} bits") from None


def build_request(prompt: str | Sequence[int], adapter_id: str = "", *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: str | Sequence[str] = (), ignore_eos: bool = False,
                  request_id: str = "", logprobs: int | None = None, min_p: float | None = None,
                  repetition_penalty: float | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None, min_new_tokens: int | None = None,
                  stop_token_ids: Sequence[int] = (), continue_final_message: bool = False,
                  chat_template_kwargs: Mapping | None = None,
                  prompt_logprobs: int | None = None,
                  logit_bias: Mapping[int, float] | None = None, cache_salt: str = "",
                  json_schema: Mapping | str | None = None, json_object: bool = False, regex: str | None = None,
                  choice: Sequence[str] | None = None, grammar: str | None = None,
                  n: int | None = None) -> pb.GenerateRequest:
    """A text prompt, a sequence of token ids, or a chat: a sequence of {"role": ..., "content": ...} messages
    that the server's chat template makes the prompt of (`continue_final_message`: the model continues the last
    message instead of starting a new turn; `chat_template_kwargs`: values the template reads, as Qwen3's
    {"enable_thinking": False}); unset sampling fields mean greedy decoding. `stop`: one stop
    string or several (a string is one stop sequence, not one per character). `adapter_id` "" is the base model;
    None is refused (protobuf would send it as "": an unset variable would silently serve the base model). A value
    of the wrong type, or one its field cannot carry, is a TypeError or ValueError naming the argument. `logprobs`:
    None for none, else each token's log-probability and that many alternatives' (0-20); `prompt_logprobs`: the
    same for the prompt's tokens after the first (the reply's prompt_token_ids and prompt_logprobs). The penalties,
    min_p, logit_bias ({token id: bias}), min_new_tokens, stop_token_ids and cache_salt: as the fields of the same names
    (protos/loraplex/v1/inference.proto). At most one of `json_schema` (a dict, or its JSON text), `json_object`,
    `regex`, `choice` (strings) and `grammar` (Lark): the output's response_format. `n`: None for one completion in
    the reply's own fields, else that many (1-16) in its `completions` (a stream's messages carry their `index`)."""
    if adapter_id is None:  # protobuf would send "", the base model: a classic unset environment variable
        raise TypeError('adapter_id is None (an unset variable?): pass "" for the base model')
    sampling = pb.SamplingParams(temperature=check_number("temperature", temperature),
                                 top_k=check_integer("top_k", top_k, *INT32),
                                 top_p=check_number("top_p", top_p), seed=check_integer("seed", seed, 0, 2 ** 64),
                                 min_p=check_number("min_p", min_p),
                                 repetition_penalty=check_number("repetition_penalty", repetition_penalty),
                                 presence_penalty=check_number("presence_penalty", presence_penalty),
                                 frequency_penalty=check_number("frequency_penalty", frequency_penalty),
                                 logit_bias=_logit_bias(logit_bias))
    stopping = pb.StoppingCriteria(max_new_tokens=check_integer("max_new_tokens", max_new_tokens, *INT32),
                                   stop=_stops(stop), ignore_eos=check_flag("ignore_eos", ignore_eos),
                                   min_new_tokens=check_integer("min_new_tokens", min_new_tokens, *INT32),
                                   stop_token_ids=_token_ids("stop_token_ids", stop_token_ids))
    request = pb.GenerateRequest(adapter_id=check_text("adapter_id", adapter_id), sampling=sampling,
                                 stopping=stopping, request_id=check_text("request_id", request_id),
                                 logprobs=check_integer("logprobs", logprobs, 0, 2 ** 32),
                                 prompt_logprobs=check_integer("prompt_logprobs", prompt_logprobs, 0, 2 ** 32),
                                 cache_salt=check_text("cache_salt", cache_salt), n=check_integer("n", n, 0, 2 ** 32))
    output_format = _response_format(json_schema=json_schema, json_object=check_flag("json_object", json_object),
                                     regex=regex, choice=choice, grammar=grammar)
    if output_format is not None:
        request.response_format.CopyFrom(output_format)
    continued = check_flag("continue_final_message", continue_final_message)
    if isinstance(prompt, (bytes, bytearray)):  # a sequence of ints, but surely meant as text
        raise TypeError("prompt must be text (str) or token ids (a sequence of int), not bytes: decode it first")
    if isinstance(prompt, Mapping):  # its keys would be taken as token ids
        raise TypeError("prompt must be text (str), token ids (a sequence of int) or chat messages (a sequence of "
                        "dicts), not one dict: pass [message]")
    if isinstance(prompt, str):
        ids = None
    else:
        try:
            ids = list(prompt)
        except TypeError:
            raise TypeError(f"prompt must be text (str), token ids (a sequence of int) or chat messages (a sequence "
                            f"of dicts), not {type(prompt).__name__}") from None
        if ids and isinstance(ids[0], Mapping):
            request.chat.CopyFrom(pb.Chat(messages=[_message(i, m) for i, m in enumerate(ids)],
                                          continue_final_message=continued))
            if chat_template_kwargs is not None:
                if not isinstance(chat_template_kwargs, Mapping):
                    raise TypeError(f"chat_template_kwargs must be a dict, not {type(chat_template_kwargs).__name__}")
                try:
                    request.chat.chat_template_kwargs.update(chat_template_kwargs)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"chat_template_kwargs: {exc}") from None
            return request
    if continued or chat_template_kwargs is not None:
        raise TypeError("continue_final_message and chat_template_kwargs apply to chat messages only")
    if ids is None:
        request.prompt = check_text("prompt", prompt)
        return request
    try:
        request.prompt_token_ids.ids.extend(ids)
    except (TypeError, ValueError):  # name the id protobuf refused (checked one by one only then: prompts are long)
        for position, token in enumerate(ids):
            integer(f"prompt token id {position}", token, *INT32)
        raise
    return request


def _response_format(**given) -> pb.ResponseFormat | None:
    named = [name for name, value in given.items() if value not in (None, False)]
    if len(named) > 1:
        raise ValueError(f"{' and '.join(named)}: a request takes one response format")
    if not named:
        return None
    name, value = named[0], given[named[0]]
    if name == "json_object":
        return pb.ResponseFormat(json_object=True)
    if name == "choice":
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise TypeError(f"choice must be a sequence of str, not {type(value).__name__}")
        return pb.ResponseFormat(choice=pb.Choices(
            choices=[check_text(f"choice[{position}]", text) for position, text in enumerate(value)]))
    if name == "json_schema" and isinstance(value, Mapping):
        try:
            value = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"json_schema cannot be written as JSON: {exc}") from None
    elif name == "json_schema" and not isinstance(value, str):
        raise TypeError(f"json_schema must be a dict or its JSON text (str), not {type(value).__name__}")
    return pb.ResponseFormat(**{name: check_text(name, value)})


def _message(position: int, message) -> pb.ChatMessage:
    if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
        raise TypeError(f"chat message {position} must be a dict of exactly 'role' and 'content', not {message!r:.80}")
    return pb.ChatMessage(role=check_text(f"chat message {position} role", message["role"]),
                          content=check_text(f"chat message {position} content", message["content"]))


def _token_ids(name: str, ids) -> list[int]:
    if isinstance(ids, (str, bytes, bytearray)) or ids is None or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a sequence of int (() for none), not {type(ids).__name__}")
    return [integer(f"{name}[{position}]", token, *INT32) for position, token in enumerate(ids)]


def _logit_bias(bias) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise TypeError(f"logit_bias must be a dict of token id to bias, not {type(bias).__name__}")
    return {integer(f"logit_bias token id {token!r}", token, *INT32): number(f"logit_bias[{token!r}]", value)
            for token, value in bias.items()}


def _stops(stop) -> list[str]:
    if isinstance(stop, str):
        return [check_text("stop", stop)]
    if stop is None or isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
        raise TypeError(f"stop must be a str or a sequence of str (() for none), not {type(stop).__name__}")
    return [check_text(f"stop[{position}]", text) for position, text in enumerate(stop)]


def load_request(adapter_id: str, replace: bool, pin: bool | None) -> pb.LoadAdapterRequest:
    return pb.LoadAdapterRequest(adapter_id=check_text("adapter_id", adapter_id),
                                 replace=check_flag("replace", replace), pin=check_flag("pin", pin, optional=True))


def unload_request(adapter_id: str, drain: bool) -> pb.UnloadAdapterRequest:
    return pb.UnloadAdapterRequest(adapter_id=check_text("adapter_id", adapter_id), drain=check_flag("drain", drain))


def adapter_request(adapter_id: str) -> pb.GetAdapterRequest:
    return pb.GetAdapterRequest(adapter_id=check_text("adapter_id", adapter_id))


def check_token(token: str | None, source: str = "token") -> str | None:
    """`token` if it can be sent: it goes in the `authorization` header, so printable ASCII without spaces. A token
    that cannot is a ValueError naming `source` (where it came from) at once, not INTERNAL "Invalid metadata"
    (sync) or a grpc ExecuteBatchError that is no RpcError (asyncio) at the first call. The token is never shown."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"{source} must be a str, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"{source}: a token of {len(token)} characters is longer than {MAX_TOKEN_CHARS} (grpc refuses "
                         f"headers that large)")
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

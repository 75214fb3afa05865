"""Conversations made token ids by the model's own chat template, one way for serving (the prompt of a chat request)
and for training (chat examples, loss on the assistant's turns), so an adapter is served the prompts it learned."""
from __future__ import annotations

import functools
import inspect
import math
import re

ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_KWARGS, MAX_KWARG_CHARS = 16, 256
MAX_DETAIL = 300  # characters of a template's own error passed on (HF's may hold the whole rendered chat)


class ChatError(ValueError):
    """The conversation cannot be rendered; the message says why (a user-facing sentence)."""


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_problem(tokenizer) -> str | None:
    """Why the model's chat template cannot serve any chat (none, or it does not compile), or None."""
    if not has_template(tokenizer):
        return "the model has no chat template (chat_template in tokenizer_config.json or chat_template.jinja)"
    try:
        template = tokenizer.get_chat_template()
    except Exception as exc:  # a list of named templates without a default one
        return f"the model's chat template cannot be chosen ({_short(exc)})"
    return _compile_error(template)


@functools.lru_cache(maxsize=8)
def _compile_error(template: str) -> str | None:
    from transformers.utils.chat_template_utils import _compile_jinja_template
    try:
        _compile_jinja_template(template)
    except Exception as exc:
        return f"the model's chat template does not compile ({_short(exc)})"
    return None


def _short(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


def check_kwargs_count(count: int) -> None:
    """At most MAX_KWARGS template kwargs (a server checks it before converting a request's: it may hold a million)."""
    if count > MAX_KWARGS:
        raise ChatError(f"chat_template_kwargs has {count} entries; at most {MAX_KWARGS}")


def template_kwargs(tokenizer, kwargs: dict) -> dict:
    """`kwargs` for the template checked: at most MAX_KWARGS, identifiers of at most 64 characters that are none of
    the template's own names (the messages, a special token, a Jinja global such as `namespace`, an argument of HF's
    rendering), each a bool, finite number or a string of at most MAX_KWARG_CHARS characters. Numbers arrive as
    doubles (protobuf's Struct, JSON): whole ones within 2^53 are given as ints, as JSON's 3 is in Python."""
    if not kwargs:
        return {}
    check_kwargs_count(len(kwargs))
    reserved = _reserved(tokenizer)
    checked = {}
    for key, value in kwargs.items():
        if not IDENTIFIER.fullmatch(key):
            raise ChatError(f"chat_template_kwargs key {key[:40]!r} is not an identifier of at most 64 characters")
        if key in reserved:
            raise ChatError(f"chat_template_kwargs key {key!r} is one of the template's own names (the messages, "
                            f"special tokens, Jinja's globals, the renderer's arguments)")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= 2 ** 53:
            value = int(value)
        if not (isinstance(value, (bool, int, str)) or isinstance(value, float) and math.isfinite(value)) or \
                isinstance(value, str) and len(value) > MAX_KWARG_CHARS:
            raise ChatError(f"chat_template_kwargs[{key!r}] must be a bool, a finite number or a string of at most "
                            f"{MAX_KWARG_CHARS} characters")
        checked[key] = value
    return checked


def _reserved(tokenizer) -> set[str]:
    from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template
    names = {"self", "messages", *tokenizer.special_tokens_map,
             *inspect.signature(tokenizer.apply_chat_template).parameters,
             *inspect.signature(render_jinja_template).parameters}
    try:
        names |= set(_compile_jinja_template(tokenizer.get_chat_template()).environment.globals)
    except Exception:  # no template, or one that does not compile: refused by template_problem
        pass
    return names


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           continue_final_message: bool = False, kwargs: dict | None = None) -> list[int]:
    """The ids of `messages` as HF apply_chat_template makes them with sanitize_control_tokens: the messages' text
    (and `kwargs`', checked by template_kwargs) never becomes a control token (a user's "<|im_end|>" must not end
    their turn), only the template's does."""
    if not messages:
        raise ChatError("the chat has no messages")
    # Templates build control tokens from roles ('<|' + role + '|>', Phi-3's): a role such as "end|>x<|assistant"
    # would forge the template's own control tokens, which sanitizing whole tokens in the input cannot catch
    bad = next((m["role"] for m in messages if not ROLE.fullmatch(m["role"])), None)
    if bad is not None:
        raise ChatError(f"message role {bad[:40]!r} is not a role name: 1-32 letters, digits, '_' or '-', starting "
                        f"with a letter (system, user, assistant, tool, ...)")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, tokenize=True,
                                            return_dict=False, sanitize_control_tokens=True, **(kwargs or {}))
    except Exception as exc:  # a template's raise_exception (roles out of order), or one it cannot render
        raise ChatError(f"the model's chat template refused these messages ({_short(exc)})") from None
    if not ids:
        raise ChatError("the model's chat template made no tokens of these messages")
    return list(ids)


def assistant_examples(tokenizer, messages: list[dict], kwargs: dict | None = None,
                       max_length: int | None = None) -> list[tuple[list[int], list[bool]]]:
    """Examples (ids, per id whether it is the assistant's to learn) teaching every assistant turn as the template
    writes it after the messages before it and its generation prompt (the prompt a served chat has), end-of-turn
    tokens included (the model learns to stop): one example of the whole conversation where the template writes
    each turn after the ones before, else one example per turn (templates that drop earlier turns' reasoning, as
    Qwen3's, or end only the last message, as Phi-3's). Turns whose prompt alone reaches `max_length` tokens are
    not rendered (none of them could be learned: rendering every turn of a long chat cost its square)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ChatError("the chat has no assistant message to learn from")
    if turns[0] == 0:
        raise ChatError("the chat starts with an assistant message: no prompt comes before it")
    spans = []
    for i in turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True, kwargs=kwargs)
        if spans and max_length is not None and len(before) >= max_length:
            break
        upto = render(tokenizer, messages[:i + 1], kwargs=kwargs)
        if upto[:len(before)] != before or len(upto) == len(before):
            raise ChatError(f"the model's chat template does not write message {i} (the assistant's) after the "
                            f"generation prompt of the messages before it, so its tokens cannot be told apart")
        spans.append((upto, len(before)))
    whole = spans[-1][0]
    if all(whole[:len(upto)] == upto for upto, _ in spans):
        learned = [False] * len(whole)
        for upto, start in spans:
            learned[start:len(upto)] = [True] * (len(upto) - start)
        return [(whole, learned)]
    return [(upto, [False] * start + [True] * (len(upto) - start)) for upto, start in spans]

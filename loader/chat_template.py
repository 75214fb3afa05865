"""Conversations made token ids by the model's own chat template, one way for serving (the prompt of a chat request)
and for training (a chat example, loss on the assistant's turns), so an adapter is served the prompts it learned."""
from __future__ import annotations


class ChatError(ValueError):
    """The conversation cannot be rendered; the message says why (a user-facing sentence)."""


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           continue_final_message: bool = False) -> list[int]:
    """The ids of `messages` as HF apply_chat_template makes them with sanitize_control_tokens: the messages' text
    never becomes a control token (a user's "<|im_end|>" must not end their turn), only the template's does."""
    if not has_template(tokenizer):
        raise ChatError("the model has no chat template (chat_template in tokenizer_config.json or "
                        "chat_template.jinja)")
    if not messages:
        raise ChatError("the chat has no messages")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, tokenize=True,
                                            return_dict=False, sanitize_control_tokens=True)
    except Exception as exc:  # a template's raise_exception (roles out of order), or one it cannot render
        raise ChatError(f"the model's chat template refused these messages ({type(exc).__name__}: {exc})") from None
    if not ids:
        raise ChatError("the model's chat template made no tokens of these messages")
    return list(ids)


def assistant_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids of the whole conversation, per id whether it is the assistant's to learn): every assistant turn's tokens
    as the template writes them, its end-of-turn tokens included (the model learns to stop), found as the tokens
    that the turn adds to the conversation before it with the generation prompt. Templates render each turn after
    the ones before (each rendering a prefix of the next); one that does not is refused, not guessed at."""
    ids = render(tokenizer, messages)
    learned = [False] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ChatError("the chat has no assistant message to learn from")
    if turns[0] == 0:
        raise ChatError("the chat starts with an assistant message: no prompt comes before it")
    for i in turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        if upto[:len(before)] != before or ids[:len(upto)] != upto or len(upto) == len(before):
            raise ChatError(f"the model's chat template does not write message {i} (the assistant's) after the "
                            f"ones before it and their generation prompt, so its tokens cannot be told apart")
        learned[len(before):len(upto)] = [True] * (len(upto) - len(before))
    return ids, learned

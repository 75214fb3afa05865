"""Chat requests: a conversation turned into prompt ids by the model's own chat template."""
from __future__ import annotations

from protos.loraplex.v1 import inference_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(chat: pb.Chat, tokenizer) -> list[int]:
    """The prompt ids of `chat`, as HF apply_chat_template makes them with sanitize_control_tokens: the messages'
    text never becomes a control token (a user's "<|im_end|>" must not end their turn), only the template's does."""
    if not has_template(tokenizer):
        raise FailedPrecondition("the model has no chat template (chat_template in tokenizer_config.json or "
                                 "chat_template.jinja): send prompt or prompt_token_ids")
    if not chat.messages:
        raise InvalidArgument("chat.messages is empty")
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=not chat.continue_final_message,
                                            continue_final_message=chat.continue_final_message, tokenize=True,
                                            return_dict=False, sanitize_control_tokens=True)
    except Exception as exc:  # a template's raise_exception (roles out of order), or one it cannot render
        raise InvalidArgument(f"the model's chat template refused these messages ({type(exc).__name__}: "
                              f"{exc})") from None
    if not ids:
        raise InvalidArgument("the model's chat template made an empty prompt of these messages")
    return list(ids)

"""Chat requests: a conversation turned into prompt ids by the model's own chat template (loader/chat_template.py,
which training uses too)."""
from __future__ import annotations

from google.protobuf import json_format

from loader.chat_template import MAX_KWARGS, ChatError, render, template_kwargs, template_problem
from protos.loraplex.v1 import inference_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument


def chat_ids(chat: pb.Chat, tokenizer) -> list[int]:
    problem = template_problem(tokenizer)
    if problem:
        raise FailedPrecondition(f"{problem}: send the prompt as text or token ids")
    if not chat.messages:
        raise InvalidArgument("chat.messages is empty")
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    if len(chat.chat_template_kwargs.fields) > MAX_KWARGS:  # before it is converted: it may hold a million keys
        raise InvalidArgument(f"chat_template_kwargs has {len(chat.chat_template_kwargs.fields)} entries; at most "
                              f"{MAX_KWARGS}")
    try:
        kwargs = json_format.MessageToDict(chat.chat_template_kwargs)
    except ValueError as exc:  # NaN or infinite numbers, which JSON cannot carry
        raise InvalidArgument(f"chat_template_kwargs: numbers must be finite ({exc})") from None
    try:
        kwargs = template_kwargs(tokenizer, kwargs)
        return render(tokenizer, messages, add_generation_prompt=not chat.continue_final_message,
                      continue_final_message=chat.continue_final_message, kwargs=kwargs)
    except ChatError as exc:
        raise InvalidArgument(str(exc)) from None

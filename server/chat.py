"""Chat requests: a conversation turned into prompt ids by the model's own chat template (loader/chat_template.py,
which training uses too)."""
from __future__ import annotations

from google.protobuf import json_format

from loader.chat_template import ChatError, check_kwargs_count, render, template_kwargs, template_problem
from protos.loraplex.v1 import inference_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument


def chat_ids(chat: pb.Chat, tokenizer) -> list[int]:
    problem = template_problem(tokenizer)
    if problem:
        raise FailedPrecondition(f"{problem}: send the prompt as text or token ids")
    try:
        return render(tokenizer, [{"role": m.role, "content": m.content} for m in chat.messages],
                      add_generation_prompt=not chat.continue_final_message,
                      continue_final_message=chat.continue_final_message,
                      kwargs=template_kwargs(tokenizer, _kwargs(chat.chat_template_kwargs)))
    except ChatError as exc:
        raise InvalidArgument(str(exc)) from None


def _kwargs(struct) -> dict:
    check_kwargs_count(len(struct.fields))  # before it is converted
    try:
        return json_format.MessageToDict(struct)
    except ValueError as exc:  # NaN or infinite numbers, which JSON cannot carry
        raise ChatError(f"chat_template_kwargs: numbers must be finite ({exc})") from None

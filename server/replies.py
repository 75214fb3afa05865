"""Engine events -> GenerateResponse and GenerateStreamResponse messages, for a request's one completion or its
GenerateRequest.n. The events come as (completion index, (engine request, event)) pairs (InferenceServicer
._events)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from protos.loraplex.v1 import inference_pb2 as pb
from server.engine_messages import EngineRequest, TokenEvent
from server.stopping import FinishReason

FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
          FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE}


def logprobs_of(found) -> list[pb.TokenLogprobs]:
    return [pb.TokenLogprobs(logprob=t.logprob, top_token_ids=t.top_token_ids, top_logprobs=t.top_logprobs)
            for t in found or ()]


async def prompt_scores(engine_request: EngineRequest, event: TokenEvent) -> dict:
    """The reply's prompt_token_ids and prompt_logprobs, on the event that carries them (a request's first). Built
    off the event loop: a long prompt's take ~0.1 s per 32k tokens, which every other stream would wait for."""
    if event.prompt_logprobs is None:
        return {}
    found = await asyncio.get_running_loop().run_in_executor(None, logprobs_of, event.prompt_logprobs.entries())
    return {"prompt_token_ids": engine_request.prompt_ids, "prompt_logprobs": found}


async def unary(events: AsyncIterator, n: int | None) -> pb.GenerateResponse:
    """The reply once every completion has ended: n unset, the one completion in the reply's own fields; else all
    in `completions`, in index order, with usage counting the prompt once."""
    tokens: dict[int, tuple[list, list, list]] = {}  # index: its token ids, texts and log-probabilities
    done: dict[int, pb.Completion] = {}
    prompt: dict = {}
    async with contextlib.aclosing(events):  # a failure here cancels every completion at once
        async for index, (engine_request, event) in events:
            ids, texts, logprobs = tokens.setdefault(index, ([], [], []))
            if isinstance(event, TokenEvent):
                prompt = prompt or await prompt_scores(engine_request, event)
                ids.extend(event.token_ids)
                texts.append(event.text)
                logprobs.extend(logprobs_of(event.logprobs))
            else:
                done[index] = pb.Completion(index=index, text="".join(texts), token_ids=ids, logprobs=logprobs,
                                            finish_reason=FINISH[event.reason],
                                            completion_tokens=event.completion_tokens)
                request_id, prompt_tokens = engine_request.request_id, event.prompt_tokens
    if n is None:
        one = done[0]
        return pb.GenerateResponse(request_id=request_id, text=one.text, token_ids=one.token_ids, logprobs=one.logprobs,
                                   finish_reason=one.finish_reason, **prompt,
                                   usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=one.completion_tokens))
    total = sum(completion.completion_tokens for completion in done.values())
    return pb.GenerateResponse(request_id=request_id, completions=[done[i] for i in range(n)], **prompt,
                               usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=total))


async def stream(events: AsyncIterator) -> AsyncIterator[pb.GenerateStreamResponse]:
    """A message per event: each step's tokens, then each completion's end with its usage."""
    async with contextlib.aclosing(events):
        async for index, (engine_request, event) in events:
            if isinstance(event, TokenEvent):
                yield pb.GenerateStreamResponse(request_id=engine_request.request_id, text=event.text,
                                                token_ids=event.token_ids, logprobs=logprobs_of(event.logprobs),
                                                index=index, **await prompt_scores(engine_request, event))
            else:
                yield pb.GenerateStreamResponse(
                    request_id=engine_request.request_id, finish_reason=FINISH[event.reason], index=index,
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))

"""What the front end and the engine thread hand each other: a request, and the events its sink receives."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from adapters.canonical import CanonicalAdapter
from server.logprobs import PromptLogprobs, TokenLogprobs
from server.sampling import SamplingParams
from server.stopping import FinishReason, StoppingParams


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when the request asks for them
    prompt_logprobs: PromptLogprobs | None = None  # on a request's first event, when it asks for them


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    error: Exception


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    adapter: CanonicalAdapter | None
    sampling: SamplingParams
    stopping: StoppingParams
    sink: Callable[[object], None]  # thread-safe; receives TokenEvent/FinishEvent/ErrorEvent
    logprobs: int | None = None  # GenerateRequest.logprobs: alternatives per token, None for no log-probabilities
    prompt_logprobs: int | None = None  # GenerateRequest.prompt_logprobs: the same for the prompt's tokens
    cache_salt: str = ""  # shares prompts' keys and values only with requests of the same salt
    matcher: object = None  # its response_format's llguidance matcher (server/response_format.py), else None
    completions: int = 1  # its call's GenerateRequest.n: the completions of one call are queued all or none
    index: int = 0  # which of them it is
    # A call that scores its prompt: an object of that call, on each of its completions (completion 0 scores). Its
    # prompt runs whole, once for them all, apart from other calls' prefills (server/prompt_sharing.py).
    scoring_call: object = None
    resume: object = None  # preempted (server/preemption.py): its engine state (admission.RowState) until a row takes it
    adapter_label: str = ""
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from any thread; the engine drops the request at its next step
    released: bool = False  # the front end has released its hold on `adapter` (the registry's memory budget)

    @property
    def name(self) -> str:
        """How logs name it: its request_id, which a call's completions share, and which completion it is."""
        return self.request_id if self.completions == 1 else f"{self.request_id} (completion {self.index})"


def tell(request: EngineRequest, event) -> None:
    """Hand `event` to the request's sink; a broken sink (its event loop closed) must not stop the others being told."""
    try:
        request.sink(event)
    except Exception:
        logging.getLogger("loraplex.engine").exception("could not deliver %s to request %s", type(event).__name__,
                                                       request.request_id)

"""Outputs held to a format (GenerateRequest.response_format): a JSON Schema, any JSON object, a regular expression,
one string of a list, or a Lark grammar, compiled by llguidance into a matcher per request. The matcher says at each
step which tokens can continue the output (the engine masks the rest: server/token_choice.py) and takes the token
chosen. Compiling runs off the event loop and off the engine thread (the servicer's _prepare); compiled formats are
kept, most recently used first, and each request gets a copy."""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from protos.loraplex.v1 import inference_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument

MAX_FORMAT_CHARS = 65536  # a schema's, regex's or grammar's text; the choices together
MAX_CHOICES = 1024
KEPT = 32  # compiled formats kept: requests of one application reuse a few
# JSON separated as json.dumps writes it. llguidance's default lets the model put any whitespace anywhere: a model
# that starts a run of newlines inside an object can then fill max_new_tokens with them. A schema's own
# "x-guidance" object overrides these (e.g. {"whitespace_flexible": true}).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's default limits bound a compile (~20 ms of lexer work) and a step's mask; its verbose errors would
# print the parser's state and the whole grammar into a status message
LIMITS = LLParserLimits(verbose_errors=False)


def format_of(request: pb.GenerateRequest) -> tuple[str, str] | None:
    """(field name, llguidance grammar) of the request's response_format, or None for free text."""
    if not request.HasField("response_format"):
        return None
    msg = request.response_format
    kind = msg.WhichOneof("format")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "choice":
        choices = list(msg.choice.choices)
        if not 1 <= len(choices) <= MAX_CHOICES:
            raise InvalidArgument(f"response_format.choice takes 1 to {MAX_CHOICES} strings, got {len(choices)}")
        if "" in choices:
            raise InvalidArgument(f"response_format.choice[{choices.index('')}] is empty")
        _check_size(kind, sum(len(c) for c in choices))
        return kind, LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if kind == "json_object":
        return kind, LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
    text = getattr(msg, kind)
    _check_size(kind, len(text))
    if kind == "regex":
        return kind, LLMatcher.grammar_from_regex(text)
    if kind == "grammar":
        return kind, LLMatcher.grammar_from_lark(text)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"response_format.json_schema is not JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidArgument(f"response_format.json_schema must be a JSON object (or true/false), not "
                              f"{type(schema).__name__}")
    return kind, LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)


def _check_size(kind: str, chars: int) -> None:
    if chars > MAX_FORMAT_CHARS:
        raise InvalidArgument(f"response_format.{kind} is {chars} characters long; at most {MAX_FORMAT_CHARS}")


class Formats:
    """One server's compiler: the model's tokenizer as llguidance reads it (built at the first use: ~1 s for a
    150k-token vocabulary), and the formats compiled lately."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int, metrics=None) -> None:
        self._tokenizer = tokenizer
        self._metrics = metrics  # server.metrics.Metrics: requests and compile times by format
        self._eos = sorted(i for i in eos_token_ids if 0 <= i < vocab_size)
        self.vocab_size = vocab_size  # the logits' width: the masks cover ids the tokenizer lacks too (never allowed)
        self._lock = threading.Lock()
        self._llg: LLTokenizer | None = None
        self._kept: OrderedDict[tuple[str, str], LLMatcher] = OrderedDict()
        self.problem = self._problem()

    def _problem(self) -> str | None:
        if not hasattr(self._tokenizer, "backend_tokenizer"):
            return (f"this model's tokenizer ({type(self._tokenizer).__name__}) is not a fast (Hugging Face "
                    f"tokenizers) one, which response_format needs")
        if not self._eos:
            return "this model has no end-of-sequence token inside its vocabulary: a format could never end"
        if len(self._tokenizer) > self.vocab_size:  # (llguidance needs every token id to have a logit)
            return (f"this model's tokenizer has {len(self._tokenizer)} tokens, more than its vocabulary's "
                    f"{self.vocab_size} logits; response_format needs a logit for every token")
        return None

    def matcher(self, kind: str, grammar: str) -> LLMatcher:
        """A fresh matcher of `grammar` (format_of's), for one request; INVALID_ARGUMENT if it does not compile."""
        if self.problem is not None:
            raise FailedPrecondition(self.problem)
        key = (kind, grammar)
        start = time.monotonic()
        if self._metrics is not None:
            self._metrics.formatted.labels(kind).inc()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept.deep_copy()
            if self._llg is None:
                self._llg = self._build()
            tokenizer = self._llg
        compiled = LLMatcher(tokenizer, grammar, log_level=0, limits=LIMITS)  # (drops the GIL while it compiles)
        if self._metrics is not None:
            self._metrics.format_compile.labels(kind).observe(time.monotonic() - start)
        if compiled.is_error():
            raise InvalidArgument(f"response_format.{kind} does not compile: {_reason(compiled.get_error())}")
        with self._lock:
            self._kept[key] = compiled
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
            return compiled.deep_copy()

    def _build(self) -> LLTokenizer:
        import llguidance.hf
        try:
            return llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos)
        except Exception as exc:  # a tokenizer llguidance cannot read: every later request hears the same
            self.problem = f"llguidance cannot read this model's tokenizer: {_reason(str(exc), 300)}"
            raise FailedPrecondition(self.problem) from None


def _reason(error: str, limit: int = 1000) -> str:
    """llguidance's message without its blank lines, bounded (a grammar's error quotes the grammar's line)."""
    text = "\n".join(line for line in error.splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


def check_stopping(stopping) -> None:
    """A format decides where the output ends: refused beside ignore_eos or min_new_tokens."""
    for name, value in (("ignore_eos", stopping.ignore_eos), ("min_new_tokens", stopping.min_new_tokens)):
        if value:
            raise InvalidArgument(f"response_format cannot go with stopping.{name}: the format decides where the "
                                  f"output ends")

"""Outputs held to a format (GenerateRequest.response_format): a JSON Schema, any JSON object, a regular expression,
one string of a list, or a Lark grammar, compiled by llguidance into a matcher for each request. The matcher says at
each step which tokens can continue the output (the engine masks the rest: server/format_masks.py) and takes the
token chosen. Compiling, and the first mask, run off the event loop and off the engine thread (the servicer's
_prepare); a source refused is remembered, and refused at once when sent again."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
import time
from collections import OrderedDict

from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from protos.loraplex.v1 import inference_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument
from server.format_masks import llguidance_message, too_costly, why_stopped

MAX_FORMAT_CHARS = 65536  # a schema's, regex's or grammar's text; the choices together
MAX_CHOICES = 1024
REFUSALS_KEPT = 256  # sources refused lately, with why: sent again, refused at once, not compiled and probed again
# CPU time (the matcher's own thread's) llguidance may take to decide a row's first token, where it builds its lexer
# lazily: ordinary formats take 0.1-2 ms on a 32000-token vocabulary, one of 13 characters ("(a{500}){500}") 0.4 s,
# then 80 ms at every step, stalling the whole batch (server/format_masks.py bounds each later step)
MAX_FIRST_MASK_CPU = 0.1
# JSON separated as json.dumps writes it. llguidance's default lets the model put any whitespace anywhere: a model
# that starts a run of newlines inside an object can then fill max_new_tokens with them. A schema's own
# "x-guidance" object overrides these (e.g. {"whitespace_flexible": true}).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Its verbose errors would print the parser's state and the whole grammar into a status message. Lexer states cost
# 1-2 kB each: 50000 bound a request's lexer to ~100 MB (llguidance's default, 250000, to ~500 MB); ordinary formats
# build hundreds.
LIMITS = LLParserLimits(max_lexer_states=50_000, verbose_errors=False)


def _malloc_trim():
    """glibc's malloc_trim, or None (another C library). llguidance allocates with the C library's malloc from the
    thread that compiles, and glibc keeps what such a thread frees in its arena: after 8 hostile regexes refused one
    after another the server's RSS stayed ~1 GB above its start (measured), memory only malloc would reuse."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the freed pages of every malloc arena back to the system (a few ms; after a refused format only)."""
    if _TRIM is not None:
        _TRIM(0)


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
    except RecursionError:
        raise InvalidArgument("response_format.json_schema is nested too deeply") from None
    if not isinstance(schema, dict):  # (llguidance refuses true and false: {} is any JSON value)
        raise InvalidArgument(f"response_format.json_schema must be a JSON object, not {json.dumps(schema)[:20]}")
    return kind, LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)


def _check_size(kind: str, chars: int) -> None:
    if chars > MAX_FORMAT_CHARS:
        raise InvalidArgument(f"response_format.{kind} is {chars} characters long; at most {MAX_FORMAT_CHARS}")


class Formats:
    """One server's compiler: the model's tokenizer as llguidance reads it (built at the first use: ~1 s for a
    150k-token vocabulary), and the sources refused lately. Each request compiles its own matcher (~1 ms, and its
    first mask ~2 ms): copies of one compiled matcher share its lexer, whose states then pile up across requests
    until its limit fails them all."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int, metrics=None) -> None:
        self._tokenizer = tokenizer
        self._metrics = metrics  # server.metrics.Metrics: requests and compile times by format
        self._eos = sorted(i for i in eos_token_ids if 0 <= i < vocab_size)
        self.vocab_size = vocab_size  # the logits' width: the masks cover ids the tokenizer lacks too (never allowed)
        self._lock = threading.Lock()
        self._llg: LLTokenizer | None = None
        self._refused: OrderedDict[tuple[str, str], str] = OrderedDict()
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
        """A matcher of `grammar` (format_of's) for one request, its first mask computed (the lexer built off the
        engine thread); INVALID_ARGUMENT if it does not compile or its first token costs too much to decide."""
        if self.problem is not None:
            raise FailedPrecondition(self.problem)
        if self._metrics is not None:
            self._metrics.formatted.labels(kind).inc()
        key = (kind, grammar)
        with self._lock:
            refused = self._refused.get(key)
            if refused is not None:
                self._refused.move_to_end(key)
                raise InvalidArgument(refused)
            if self._llg is None:
                self._llg = self._build()
            tokenizer = self._llg
        start = time.monotonic()
        matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=LIMITS)  # (drops the GIL while it compiles)
        refusal = self._refusal(kind, matcher)
        if self._metrics is not None:
            self._metrics.format_compile.labels(kind).observe(time.monotonic() - start)
        if refusal is None:
            return matcher
        del matcher  # the lexer states its first mask built (~100 MB for a hostile regex): freed, and given back
        release_freed_memory()
        with self._lock:
            self._refused[key] = refusal
            while len(self._refused) > REFUSALS_KEPT:
                self._refused.popitem(last=False)
        raise InvalidArgument(refusal)

    def _refusal(self, kind: str, matcher: LLMatcher) -> str | None:
        if matcher.is_error():
            return f"response_format.{kind} does not compile: {llguidance_message(matcher.get_error())}"
        cpu = time.thread_time()  # (this thread's: not the time it waits for the GIL or a core)
        matcher.compute_bitmask()
        cpu = time.thread_time() - cpu
        if matcher.is_error():
            return f"response_format.{kind} {why_stopped(matcher)}"
        if cpu > MAX_FIRST_MASK_CPU:
            return f"response_format.{kind} {too_costly(cpu, MAX_FIRST_MASK_CPU, 'the first token')}"
        return None

    def _build(self) -> LLTokenizer:
        import llguidance.hf
        try:
            return llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos)
        except Exception as exc:  # a tokenizer llguidance cannot read: every later request hears the same
            self.problem = f"llguidance cannot read this model's tokenizer: {llguidance_message(str(exc), 300)}"
            raise FailedPrecondition(self.problem) from None


def check_stopping(stopping) -> None:
    """A format decides where the output ends: refused beside ignore_eos or min_new_tokens."""
    for name, value in (("ignore_eos", stopping.ignore_eos), ("min_new_tokens", stopping.min_new_tokens)):
        if value:
            raise InvalidArgument(f"response_format cannot go with stopping.{name}: the format decides where the "
                                  f"output ends")

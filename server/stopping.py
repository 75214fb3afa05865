"""Incremental detokenization and stop conditions for one row."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


UTF8_MAX_BYTES = 4


class FinishReason(Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class TextStream:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character and never
    show any part of a stop sequence (text that could still become one is held back)."""

    def __init__(self, tokenizer, params: StoppingParams, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._eos = eos_token_ids
        self.ids: list[int] = []
        self._carries: list[bool] = []  # per id: whether it decodes to any text alone (may hold a character's bytes)
        self._prefix = 0  # ids[_prefix:_read] decode to the tail already folded into `text`
        self._read = 0
        self.text = ""
        self._emitted = 0
        self._stops = StopMatcher(params.stop)
        self.finish: FinishReason | None = None

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that may be shown now. Sets `finish` when done."""
        self.ids.append(token)
        self._carries.append(self._decode(len(self.ids) - 1, len(self.ids)) != "")
        if token in self._eos and not self._params.ignore_eos:
            self.finish = FinishReason.EOS_TOKEN
        else:
            self._decode_tail()
            if self._cut_at_stop():
                self.finish = FinishReason.STOP_SEQUENCE
        if self.finish is None and len(self.ids) >= self._params.max_new_tokens:
            self.finish = FinishReason.LENGTH
        if self.finish in (FinishReason.EOS_TOKEN, FinishReason.LENGTH):
            self._decode_tail(final=True)  # bytes of a character that never completed: U+FFFD, as decode(ids) has
            if self._cut_at_stop():
                self.finish = FinishReason.STOP_SEQUENCE
        safe = len(self.text) if self.finish else len(self.text) - self._held_back()
        delta = self.text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return delta

    def _decode_tail(self, final: bool = False) -> None:
        """Fold the ids not yet in `text` into it, unless they end inside a UTF-8 character (decoded as U+FFFD
        until its last byte arrives). A character is at most 4 bytes, so its unfinished start lies within the
        last 3 waiting tokens that carry any text (special tokens and a tokenizer's stripped leading space carry
        none; tokens with bytes decode to something, if only U+FFFD). Once 4 such tokens wait, the text before
        those 3 can only be final: it is folded (invalid bytes as U+FFFD, as decoding all the ids gives) at the
        latest token split that cuts no character. Else the window decoded at every token would grow with a run
        of invalid bytes: quadratic, and no text shown for the whole run."""
        before, after = self._decode(self._prefix, self._read), self._decode(self._prefix, len(self.ids))
        if len(after) <= len(before):
            return
        end = len(self.ids)
        if after.endswith("\ufffd") and not final:
            carrying = [i for i in range(self._read, end) if self._carries[i]]
            if len(carrying) < UTF8_MAX_BYTES:
                return
            for at in range(carrying[1 - UTF8_MAX_BYTES], self._read, -1):
                head = self._decode(self._prefix, at)
                if head + self._decode(at, end) == after:
                    end, after = at, head
                    break
            else:
                return  # no split cuts no character: wait (a character ends within 4 byte-carrying tokens)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, end

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _cut_at_stop(self) -> bool:
        cut = self._stops.first_match(self.text)
        if cut is None:
            return False
        self.text = self.text[:cut]
        return True

    def _held_back(self) -> int:
        return self._stops.partial


class StopMatcher:
    """The stop sequences matched against a text that only grows, each character looked at once (Knuth-Morris-
    Pratt, one automaton per stop): per token the work is the new characters times the stops, not the whole text
    times the stops' lengths squared (16 stops of 256 characters made every row's token ~40x dearer)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = [s for s in stops if s]
        self._fallback = [_failure(s) for s in self._stops]
        self._matched = [0] * len(self._stops)  # per stop: its longest prefix that ends the text scanned so far
        self._scanned = 0

    def first_match(self, text: str) -> int | None:
        """Where the earliest stop sequence starts in `text` (which extends the text of the previous call), or None."""
        starts = []
        for at in range(self._scanned, len(text)):
            c = text[at]
            for i, stop in enumerate(self._stops):
                n = self._matched[i]
                while n and stop[n] != c:
                    n = self._fallback[i][n - 1]
                n = n + 1 if stop[n] == c else 0
                if n == len(stop):
                    starts.append(at + 1 - n)
                    n = self._fallback[i][n - 1]
                self._matched[i] = n
        self._scanned = len(text)
        return min(starts) if starts else None

    @property
    def partial(self) -> int:
        """Length of the longest tail of the scanned text that is a proper prefix of a stop sequence."""
        return max(self._matched, default=0)


def _failure(s: str) -> list[int]:
    """fallback[n - 1]: the longest proper prefix of s[:n] that is also its suffix."""
    fallback, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fallback[k - 1]
        if s[i] == s[k]:
            k += 1
        fallback[i] = k
    return fallback

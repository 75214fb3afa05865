"""Incremental detokenization and stop conditions for one row."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


UTF8_MAX_BYTES = 4
SPLITS_TRIED = 8  # token splits tried per search for one that cuts no character
CONTEXT_TOKENS = 4  # prompt tokens with text decoded before the generated ones, whose text depends on what precedes
CONTEXT_LOOKBACK = 64  # prompt tokens looked through for them at most (a prompt may end in many special tokens)


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
    # Tokens whose generation stops the row as a stop sequence would (their id is the last of the row's ids, the
    # text ends before it): the request's stop_token_ids, and the special tokens (left out of the text) whose text
    # is one of `stop`.
    stop_token_ids: frozenset[int] = frozenset()
    min_new_tokens: int = 0  # tokens before the one that ends the row (its end tokens are banned until then)


class TextStream:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character and never
    show any part of a stop sequence (text that could still become one is held back).

    The text is the prompt's continuation, decode(prompt + ids) after decode(prompt) as HF's text-generation
    pipeline returns it: a SentencePiece token's leading space shows after a prompt (decoded alone, a first token
    loses it). Decoding leaves out special tokens and tokenizers' clean_up_tokenization_spaces, which rewrites
    spaces before punctuation once it sees the next token ("don ' t" -> "don't"): no stream can show text that a
    later token would take back."""

    def __init__(self, tokenizer, params: StoppingParams, eos_token_ids: frozenset[int],
                 prompt: list[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._eos = eos_token_ids
        self.ids: list[int] = []
        context = self._context(prompt)
        self._all = context  # decoded: the prompt's last tokens, then `ids` but an end token
        # per id of _all: whether it decodes to any text alone (filled in only when a split is searched for, which
        # most tokens never need: a decode per token saved)
        self._carries: list[bool] = [True] * len(context)
        self._prefix = 0  # _all[_prefix:_read] decode to the tail of `_folded`: context for decoding what follows
        self._read = len(context)
        self._folded = ""  # the text of ids up to _read: final
        self._unsplit = 0  # waiting ids when a search for a split last failed
        self.text = ""  # all that can be shown: `_folded` and what follows it up to an unfinished character
        self._emitted = 0
        self._stops = StopMatcher(params.stop)
        self.finish: FinishReason | None = None

    def _context(self, prompt: list[int]) -> list[int]:
        """The prompt's last CONTEXT_TOKENS tokens that carry text, from a token where a character starts. After
        special tokens alone (they decode to nothing), a first token would be decoded as the text's start, and a
        SentencePiece "▁the" lose its space; a window that cuts a character decodes its first bytes as U+FFFD (a
        byte-fallback decoder, the whole run of bytes), which may then change when the whole is decoded."""
        start, carrying, floor = len(prompt), 0, max(0, len(prompt) - CONTEXT_LOOKBACK)
        while start > floor and carrying < CONTEXT_TOKENS:
            start -= 1
            carrying += self._decode_ids([prompt[start]]) != ""
        for _ in range(UTF8_MAX_BYTES - 1):  # a character's first byte is at most 3 tokens before
            if start == 0 or not self._decode_ids(prompt[start:]).startswith("\ufffd"):
                break
            start -= 1
        return list(prompt[start:])

    def push(self, token: int, end_as_text: bool = False) -> str:
        """Add one generated token; returns the text that may be shown now. Sets `finish` when done.
        `end_as_text`: an end-of-sequence id that a response format took as its text (an ordinary token "." that the
        model's configs list as an end), which ends nothing."""
        self.ids.append(token)
        matched_in_text = False
        may_end = len(self.ids) > self._params.min_new_tokens
        # An end token's text (an ordinary token may be one) is never shown: the text ends before it.
        if token in self._eos and not self._params.ignore_eos and may_end and not end_as_text:
            self.finish = FinishReason.EOS_TOKEN
        elif token in self._params.stop_token_ids and may_end:
            self.finish = FinishReason.STOP_SEQUENCE
        else:
            self._all.append(token)
            self._decode_tail()
            matched_in_text = self._cut_at_stop(may_end)
            if matched_in_text:
                self.finish = FinishReason.STOP_SEQUENCE
        if self.finish is None and len(self.ids) >= self._params.max_new_tokens:
            self.finish = FinishReason.LENGTH
        if self.finish is not None and not matched_in_text:  # the text ends here: nothing more can complete it
            self._decode_tail(final=True)  # bytes of a character that never completed: U+FFFD
            if self._cut_at_stop(may_end):
                self.finish = FinishReason.STOP_SEQUENCE
        safe = len(self.text) if self.finish else len(self.text) - self._held_back()
        delta = self.text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return delta

    def _decode_tail(self, final: bool = False) -> None:
        """Bring `text` up to date with the ids. The window _all[_prefix:] is decoded whole (_all[_prefix:_read]
        for context, their text already folded into `_folded`); if it ends inside a UTF-8 character (U+FFFD until
        its last byte arrives), all before that character is shown and the rest waits. Decoding is prefix-stable
        (later bytes change only a character still unfinished), so shown text is never taken back."""
        before, after = self._decode(self._prefix, self._read), self._decode(self._prefix, len(self._all))
        if len(after) <= len(before):
            return
        if after.endswith("\ufffd") and not final:
            self.text = self._folded + after[len(before):].rstrip("\ufffd")
            self._fold_finished_head(before, after)
            return
        self._folded += after[len(before):]
        self.text = self._folded
        self._prefix, self._read = self._read, len(self._all)

    def _fold_finished_head(self, before: str, after: str) -> None:
        """Keep the decoded window short while a character is unfinished (a run of invalid bytes would otherwise
        grow it with every token): fold its head at a token split that cuts no character. The unfinished
        character (at most 3 bytes so far) lies within the last 3 waiting tokens that carry text (special tokens
        and a stripped leading space carry none; a byte token decodes to U+FFFD at least), so the split is before
        them. Byte-level BPE tokens can cut characters at every split: then no split is found, the search is
        retried only once the window has doubled, and the window's decoding costs linear time per token."""
        end = len(self._all)
        self._carries += [self._decode_ids([t]) != "" for t in self._all[len(self._carries):]]
        carrying = [i for i in range(self._read, end) if self._carries[i]]
        if len(carrying) < UTF8_MAX_BYTES or end - self._read < 2 * self._unsplit:
            return
        last = carrying[1 - UTF8_MAX_BYTES]
        for at in range(last, max(self._read, last - SPLITS_TRIED), -1):
            head = self._decode(self._prefix, at)
            if head + self._decode(at, end) == after:
                self._folded += head[len(before):]
                self._prefix, self._read, self._unsplit = self._read, at, 0
                return
        self._unsplit = end - self._read

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._all[start:end])

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _cut_at_stop(self, may_end: bool) -> bool:
        """Whether a stop sequence ends the text now (cutting it there). Before min_new_tokens a match is passed
        over: only a stop that a later token completes counts."""
        cut = self._stops.first_match(self.text)
        if cut is None or not may_end:
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

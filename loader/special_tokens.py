"""The tokenizer's tokens that decoding leaves out of the generated text (skip_special_tokens=True: special tokens,
and added tokens marked special, such as ChatML's <|im_end|>), by their text: a stop sequence that is such a text
stops on the token (server/validation.py, server/stopping.py), since it never shows in the text stops match."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SkippedTokens:
    ids: dict[str, frozenset[int]]  # a skipped token's text -> its ids (tokenizers rarely give one text two ids)
    _lengths: tuple[int, ...] = field(init=False, repr=False)
    _firsts: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lengths", tuple(sorted({len(t) for t in self.ids})))
        object.__setattr__(self, "_firsts", frozenset(t[0] for t in self.ids))

    @classmethod
    def of(cls, tokenizer) -> SkippedTokens:
        """Each special or added token that decodes to nothing when special tokens are skipped (as the server
        decodes) and to its text otherwise: found by decoding, so whatever rule this tokenizer applies is the one
        seen (a fast tokenizer skips added tokens marked special, not the others)."""
        candidates = set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)
        ids: dict[str, set[int]] = {}
        for i in sorted(candidates):
            text = tokenizer.convert_ids_to_tokens(i)
            if text and tokenizer.decode([i], skip_special_tokens=True) == "" and tokenizer.decode([i]) != "":
                ids.setdefault(text, set()).add(i)
        return cls({text: frozenset(found) for text, found in ids.items()})

    def found_in(self, text: str) -> str | None:
        """The first skipped token's text (the longest where several start at one place) inside `text`, or None.
        Looks only where such a text may start and at the lengths such texts have: a few set lookups a character,
        not one substring search per token (tokenizers reserve thousands of special tokens)."""
        for at, c in enumerate(text):
            if c in self._firsts:
                for n in reversed(self._lengths):
                    if at + n <= len(text) and text[at:at + n] in self.ids:
                        return text[at:at + n]
        return None

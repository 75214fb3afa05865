"""Training data: JSONL, one object per line, `{"prompt", "completion"}` (loss on the completion only),
`{"text"}` (loss on every token) or `{"messages"}` (a chat through the model's chat template, loss on the assistant's
turns). Errors name the file, the line and the reason."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from loader import json_input
from loader.base_model import longest_token_chars
from loader.chat_template import ChatError, assistant_examples, template_kwargs, template_problem

log = logging.getLogger("loraplex.train")
IGNORE = -100  # label of tokens that carry no loss (prompt, padding): HF's ignore_index


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def jsonl_lines(path: Path) -> list[str]:
    """The file's lines split at newlines only: str.splitlines() also splits at U+2028, U+2029, U+0085 and other
    separators that JSON strings may hold unescaped (json.dumps(..., ensure_ascii=False) writes them so). A UTF-8
    byte order mark at the start (Windows editors and PowerShell write one) is dropped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); JSONL is "
                        f"UTF-8 text") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")


def read_jsonl(path: Path, tokenizer, max_length: int, vocab_size: int | None = None) -> list[Example]:
    """`vocab_size`: the model's (config.vocab_size); a token id at or beyond it (a tokenizer that knows tokens the
    model has no embedding row for) is refused naming the line, rather than an IndexError in the first step."""
    eos = tokenizer.eos_token_id
    # Only the first max_length tokens of an example are kept, so a string longer than `cap` characters (4x what
    # max_length tokens can spell) is cut before it is tokenized: tokenizing a 20 MB line whole took 4.4 GB. The
    # cut only changes tokens of the word it falls in, and that word could only reach back into the tokens kept
    # if it ran for over 3 x max_length tokens' worth of characters without a break. No cut where the tokenizer
    # gives no characters-per-token bound (see longest_token_chars).
    bound = longest_token_chars(tokenizer)
    cap = 4 * max_length * bound if bound else None
    examples, truncated, merged = [], 0, 0
    for number, line in enumerate(jsonl_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json_input.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        problem = _not_text(record)
        if problem:
            raise DataError(f"{where}: {problem}")
        given = [k for k in ("messages", "text", "prompt", "completion") if k in record]
        if "messages" in record and len(given) > 1:
            raise DataError(f"{where}: has 'messages' and '{given[1]}': give either a chat (messages) or text, or "
                            f"prompt and completion")
        if "text" in record and ("prompt" in record or "completion" in record):  # which loss was meant?
            raise DataError(f"{where}: has 'text' and {'prompt' if 'prompt' in record else 'completion'}: give "
                            f"either text (loss on every token) or prompt and completion (loss on the completion)")
        if "chat_template_kwargs" in record and "messages" not in record:
            raise DataError(f"{where}: has 'chat_template_kwargs' without 'messages': they are a chat's")
        if "messages" in record:
            pairs = _chat(tokenizer, record["messages"], record.get("chat_template_kwargs", {}), where, cap,
                          max_length)
        elif "text" in record and isinstance(record["text"], str) and record["text"]:
            ids = tokenizer(record["text"][:cap]).input_ids + ([eos] if eos is not None else [])
            pairs = [(ids, list(ids))]
        elif all(isinstance(record.get(k), str) for k in ("prompt", "completion")) and record["completion"]:
            prompt, completion = _prompt_and_completion(tokenizer, record["prompt"][:cap],
                                                        record["completion"][:cap])
            merged += completion is None
            if completion is None:  # the boundary's tokens merge: the completion's own tokens after the prompt's
                completion = tokenizer(record["completion"][:cap], add_special_tokens=False).input_ids
            completion += [eos] if eos is not None else []
            pairs = [(prompt + completion, [IGNORE] * len(prompt) + completion)]
        else:
            raise DataError(f"{where}: needs a non-empty string 'text', string 'prompt' and non-empty string "
                            f"'completion', or a list of 'messages'; got keys {sorted(record)}")
        truncated += sum(len(ids) > max_length for ids, _ in pairs)
        pairs = [(ids[:max_length], labels[:max_length]) for ids, labels in pairs]
        for ids, _ in pairs:
            beyond = next((i for i in ids if vocab_size is not None and i >= vocab_size), None)
            if beyond is not None:
                raise DataError(f"{where}: tokenizes to {tokenizer.decode([beyond])!r} (id {beyond}), a token the "
                                f"tokenizer knows but the model does not: its vocabulary has {vocab_size} tokens")
        # a loss predicts each token from those before it; a chat's turns past --max-length are left out
        learnable = [(ids, labels) for ids, labels in pairs if any(label != IGNORE for label in labels[1:])]
        if not learnable:
            ids, labels = pairs[0]
            raise DataError(f"{where}: the prompt fills --max-length {max_length}; no completion token is left to "
                            f"learn from" if labels and labels[0] == IGNORE else
                            f"{where}: a single token, with none before it to be predicted from")
        examples += [Example(ids, labels) for ids, labels in learnable]
    if not examples:
        raise DataError(f"{path}: no examples")
    if merged:
        log.warning("%s: in %d of %d examples the prompt's last token merges with the completion's first when "
                    "tokenized together (a prompt ending in a space?); they are trained as the prompt's tokens "
                    "followed by the completion's own, which the model may not produce after that prompt", path,
                    merged, len(examples))
    if truncated:  # their ends (often the EOS the model should learn to stop with) are not trained on
        log.warning("%s: %d of %d examples are longer than --max-length %d tokens and were cut to it", path,
                    truncated, len(examples), max_length)
    return examples


def _prompt_and_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int] | None]:
    """(the prompt's tokens, the completion's as they follow them), from the two tokenized together, as the served
    prompt is continued: a SentencePiece tokenizer reads a completion alone as a new text ("Paris" becomes
    "▁Paris", a space the data never had). None for the completion where the prompt's tokens are not a prefix of
    the whole's (its last token merges with the completion's first)."""
    prompt_ids = tokenizer(prompt).input_ids
    whole = tokenizer(prompt + completion).input_ids
    if whole[:len(prompt_ids)] != prompt_ids or len(whole) == len(prompt_ids):
        return prompt_ids, None
    return prompt_ids, whole[len(prompt_ids):]


def _chat(tokenizer, messages, kwargs, where: str, cap: int | None,
          max_length: int) -> list[tuple[list[int], list[int]]]:
    """A chat's examples' ids and labels: the assistant's turns learned, as the template writes them. Its text is
    cut as a text's is (contents at `cap` characters), and so is its number of messages, at --max-length: a template
    writes every message as a token at least, so later ones start past what is kept."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or \
                not all(isinstance(v, str) for v in m.values()):
            raise DataError(f"{where}: message {i} must be an object of exactly 'role' and 'content', both strings")
        problem = _not_text(m, ("role", "content"))
        if problem:
            raise DataError(f"{where}: message {i}: {problem}")
    problem = template_problem(tokenizer)
    if problem:
        raise DataError(f"{where}: {problem}; give prompt and completion instead")
    if not isinstance(kwargs, dict):
        raise DataError(f"{where}: 'chat_template_kwargs' must be an object")
    problem = _not_text(kwargs, kwargs)  # (its strings; other values are checked by template_kwargs)
    if problem:
        raise DataError(f"{where}: chat_template_kwargs: {problem}")
    messages = [dict(m, content=m["content"][:cap]) for m in messages[:max_length]]
    try:
        examples = assistant_examples(tokenizer, messages, template_kwargs(tokenizer, kwargs), max_length)
    except ChatError as exc:
        raise DataError(f"{where}: {exc}") from None
    return [(ids, [t if keep else IGNORE for t, keep in zip(ids, learned)]) for ids, learned in examples]


def _not_text(record: dict, keys=("text", "prompt", "completion")) -> str | None:
    """Why a string of the record is no text a tokenizer can take, or None. JSON may escape half of a UTF-16
    surrogate pair on its own ("\\ud800"); json.loads keeps it as a lone surrogate, which UTF-8 cannot encode and
    the tokenizer refuses with a TypeError."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"'{key}' holds a lone UTF-16 surrogate escape (\\u{ord(value[exc.start]):04x}) at character "
                        f"{exc.start}, which is no character; escape a character outside the BMP as a pair "
                        f"(\\ud83d\\ude00) or write it as UTF-8")
    return None


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e.input_ids), 1, torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

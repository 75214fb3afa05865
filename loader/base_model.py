"""Load the frozen base model and its tokenizer from a local Hugging Face directory (never the hub)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loader.default_model import default_model_dir

log = logging.getLogger("loraplex.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    model_type: str
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_token_chars: int | None  # most characters of text one token stands for (longest_token_chars)


# Pieces of a fast tokenizer (tokenizer.json) that never drop or merge away characters of the text.
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split", "Sequence"}
COMPOSING_NORMALIZERS = {"NFC", "NFKC", "NFD", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}


def _kinds(spec: dict | None) -> list[dict]:
    """A tokenizer.json component and the ones a Sequence holds."""
    if not spec:
        return []
    inner = spec.get("pretokenizers") or spec.get("normalizers") or []
    return [spec, *(part for child in inner for part in _kinds(child))]


def _lengthening(replace: dict) -> bool:
    """A Replace normalizer that never shortens the text: a literal pattern (a regex may match any run of
    characters, as SentencePiece conversions' " {2,}") replaced by content at least as long."""
    literal = (replace.get("pattern") or {}).get("String")
    return literal is not None and len(replace.get("content") or "") >= len(literal)


def device_problem(device: str) -> str | None:
    """Why `device` (a --device flag) cannot hold a model here, or None."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: this torch build or machine has no CUDA device (torch {torch.__version__}); use " \
               f"--device cpu"
    return None


def longest_token_chars(tokenizer) -> int | None:
    """An upper bound on the characters of text one token stands for, so that a prompt of C characters has at
    least C / bound tokens and one too long to fit is refused before it is tokenized (tokenizing a 4 MiB prompt
    takes about 1 GB). None where the tokenizer may drop characters or fuse any number of them into one token,
    so that no bound holds: whitespace-splitting pre-tokenizers, stripping normalizers, unknown tokens fused
    without byte fallback, added tokens that swallow the whitespace around them. Then prompts are tokenized whole
    (gRPC's 4 MiB message limit still bounds them).

    The bound is the longest token string: byte-level tokens spell one character per byte and a character is at
    least one byte, so they never undercount; SentencePiece byte-fallback tokens (<0x41>) overcount. Four times
    that where a normalizer may compose several characters into one (NFC/NFKC, Hangul jamo: at most three)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: nothing is known of what it does
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    fuses_unknown = model.get("type") in ("WordPiece", "WordLevel") or (
        model.get("type") in ("BPE", "Unigram") and model.get("fuse_unk", model.get("type") == "Unigram")
        and not model.get("byte_fallback"))
    pre = _kinds(spec.get("pre_tokenizer"))
    if (fuses_unknown or any(p["type"] not in KEEPING_PRE_TOKENIZERS or p.get("behavior") == "Removed" for p in pre)
            or any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])):
        return None
    normalizers = _kinds(spec.get("normalizer"))
    if any(n["type"] not in COMPOSING_NORMALIZERS or (n["type"] == "Replace" and not _lengthening(n))
           for n in normalizers):
        return None
    longest = max((len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t), default=1)
    return longest * (4 if normalizers else 1)


def load_base_model(model: str, device: str, dtype: str) -> BaseModel:
    """`model` is a local HF causal-LM directory, or `default` for the built-in model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = default_model_dir() if model == "default" else Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                  attn_implementation="sdpa")
    except ValueError as exc:  # a family without SDPA support (Gemma-2: attention logit soft-capping)
        if "does not support" not in str(exc):
            raise
        log.info("%s: no SDPA attention in transformers for this model; using its eager attention", path)
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                  attn_implementation="eager")
    hf.to(device).eval().requires_grad_(False)
    config = hf.config
    max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    eos = end_of_sequence_ids(config, getattr(hf, "generation_config", None), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    return BaseModel(hf, tokenizer, str(model), config.model_type, config.vocab_size, int(max_context),
                     frozenset(eos), int(pad), longest_token_chars(tokenizer))


def _ids(value) -> list[int]:
    """An eos_token_id setting (None, an int, or a list of ints) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def end_of_sequence_ids(config, generation_config, tokenizer) -> list[int]:
    """Every token that ends a generation, in order of first mention: config.json's eos_token_id, then
    generation_config.json's, then the tokenizer's eos token. Their union, because each source alone misses some:
    instruct models (Llama-3-Instruct's <|eot_id|>, Gemma-it's <end_of_turn>) list their end-of-turn ids only in
    generation_config.json, which is what HF generate stops on, and some tokenizers name an eos the configs omit."""
    sources = {"config.json": _ids(config.eos_token_id),
               "generation_config.json": _ids(getattr(generation_config, "eos_token_id", None)),
               "tokenizer": _ids(tokenizer.eos_token_id)}
    union = list(dict.fromkeys(i for ids in sources.values() for i in ids))
    log.info("end-of-sequence token ids: %s (%s)", union,
             "; ".join(f"{name}: {ids or 'none'}" for name, ids in sources.items()))
    if not union:
        log.warning("no end-of-sequence token in config.json, generation_config.json or the tokenizer: every "
                    "generation runs to its max_new_tokens or a stop sequence")
    return union

"""Load the frozen base model and its tokenizer from a local Hugging Face directory (never the hub)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loader.default_model import default_model_dir

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
    max_token_chars: int  # most characters of text one token can stand for (see longest_token_chars)


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters of text one token stands for, so that a prompt of C characters has at
    least C / bound tokens and one too long to fit is refused before it is tokenized (tokenizing a 4 MiB prompt
    takes about 1 GB). From the vocabulary's token strings: byte-level tokens spell one character per byte and a
    character is at least one byte, so they never undercount; SentencePiece byte-fallback tokens (<0x41>)
    overcount. Four times that where a normalizer runs, which may compose several characters into one (NFC/NFKC,
    Hangul jamo: at most three). A normalizer that deletes characters (BERT's control-character cleaning) could
    still undercount; causal LMs' tokenizers do not have one, and prompt_token_ids are never bounded this way."""
    longest = max((len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return longest * (1 if backend is not None and backend.normalizer is None else 4)


def load_base_model(model: str, device: str, dtype: str) -> BaseModel:
    """`model` is a local HF causal-LM directory, or `default` for the built-in model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = default_model_dir() if model == "default" else Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                              attn_implementation="sdpa")
    hf.to(device).eval().requires_grad_(False)
    config = hf.config
    max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    return BaseModel(hf, tokenizer, str(model), config.model_type, config.vocab_size, int(max_context),
                     eos_ids, int(pad), longest_token_chars(tokenizer))

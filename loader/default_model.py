"""The byte-level tokenizer and small random models (tests, benchmarks, and the built-in model's start),
and where the shipped built-in model lives (`--model default`; rebuilt by `loraplex build-default`)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
BUILTIN_DIR = Path(os.environ.get("LORAPLEX_BUILTIN", Path(__file__).resolve().parent.parent / "models" / "builtin"))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 3 special tokens, then one token per byte (vocab 259)."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """Small configs for the default model and the tests (random weights, fp32)."""
    tok = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, **tok)
    else:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **tok)
    cfg.update(overrides)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **cfg)


def build_model_dir(out: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random-weight HF model directory with the byte tokenizer. Deterministic for a seed."""
    tokenizer = build_tokenizer()
    config = tiny_config(model_type, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def default_model_dir() -> Path:
    path = BUILTIN_DIR / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {path}; rebuild it with `loraplex build-default`")
    return path


def default_adapter_root() -> Path:
    """The demo adapters shipped with the built-in model."""
    return BUILTIN_DIR / "adapters"

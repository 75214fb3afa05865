"""Load the frozen base model and its tokenizer from a local Hugging Face directory (never the hub)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loader.default_model import default_model_dir
from loader.special_tokens import SkippedTokens

log = logging.getLogger("loraplex.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    model_type: str
    vocab_size: int  # config.vocab_size: the rows of the input embedding and of the LM head (transformers loads
    # no checkpoint whose shapes differ from it); every id fed to the model is checked against it
    max_context: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_token_chars: int | None  # most characters of text one token stands for (longest_token_chars)
    skipped_tokens: SkippedTokens  # tokens decoding leaves out of the text, by their text (stops on them)


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


HALF_PRECISION_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def slow_dtype_warning(device: str, dtype: str, cpu_flags: set[str] | None = None) -> str | None:
    """Why a half-precision model will run slowly on this CPU, or None: without its dtype's matrix instructions
    torch emulates them (a 4-layer 1024-wide Llama, one prompt: bf16 1.6 s vs fp32 0.23 s, AVX2 emulated)."""
    if torch.device(device).type != "cpu" or dtype not in HALF_PRECISION_FLAGS:
        return None
    if cpu_flags is None:
        try:
            cpu_flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
        except OSError:
            return None  # not Linux: no way to tell, say nothing
    if any(flag in cpu_flags for flag in HALF_PRECISION_FLAGS[dtype]):
        return None
    return (f"--dtype {dtype} on a CPU without {' or '.join(HALF_PRECISION_FLAGS[dtype])}: torch emulates its "
            f"matrix products, several times slower than float32; serve --dtype float32 on this machine")


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


class UnservableModel(ValueError):
    """A --model folder that is not a complete decoder-only causal LM with its tokenizer: refused at start-up in one
    line (server/app.py), never served with random or missing parts."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.tiktoken")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_config(path: Path):
    """config.json, parsed, of a model family this transformers knows, and not an encoder-decoder."""
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # invalid JSON, no or an unknown model_type, ...
        raise UnservableModel(f"{path / 'config.json'} cannot be read as a model configuration: "
                              f"{_first_line(exc)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UnservableModel(f"{path}: a {config.model_type} encoder-decoder model (config.json is_encoder_decoder); "
                              f"this server generates with decoder-only causal LMs")
    return config


def _read_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers' reasons vary by tokenizer class (ValueError, OSError, TypeError, ...)
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UnservableModel(f"{path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)}; copy the "
                                  f"tokenizer files of the model into the folder") from None
        raise UnservableModel(f"{path}: its tokenizer cannot be loaded: {_first_line(exc)}") from None


def _read_weights(path: Path, dtype: str, config):
    """The causal LM with every one of its tensors read from the folder's weights files (`config`: _read_config's)."""
    def load(attention: str):
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                    attn_implementation=attention, output_loading_info=True)
    try:
        try:
            hf, info = load("sdpa")
        except ValueError as exc:  # a family without SDPA support (Gemma-2: attention logit soft-capping)
            if "does not support" not in str(exc):
                raise
            log.info("%s: no SDPA attention in transformers for this model; using its eager attention", path)
            hf, info = load("eager")
    except OSError as exc:  # no weights file, an unreadable one
        raise UnservableModel(f"{path}: {_first_line(exc)}") from None
    except ValueError as exc:  # a family with no causal-LM class (T5, ...)
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise UnservableModel(f"{path}: transformers has no causal-LM class for its model_type "
                              f"{config.model_type!r}; this server generates with decoder-only causal LMs") from None
    # Tensors the files lack are initialised at random, with only a table in transformers' log to say so: a partial
    # download, or a checkpoint of another architecture (a BERT encoder given an untrained LM head). Weights tied
    # to others (an LM head sharing the embedding) are not reported missing.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        saved = ", ".join(hf.config.architectures or []) or "not recorded"
        raise UnservableModel(f"{path}: the weights files lack {len(missing)} tensors of {type(hf).__name__} "
                              f"({shown}), which would be random (architecture the checkpoint was saved as: {saved}); "
                              f"re-download the folder, or give --model a complete causal LM")
    return hf


def _check_causal(hf, path: Path) -> None:
    """Refuse a model whose logits for a token depend on later tokens: a bidirectional encoder served through its
    causal-LM class (BertLMHeadModel without is_decoder) generates garbage, and no config field tells every such
    family from a decoder (GPT-NeoX's config has is_decoder false too). One forward of a few tokens, twice."""
    vocab = hf.config.get_text_config().vocab_size
    device = next(hf.parameters()).device
    ids = torch.arange(1, 9, device=device).remainder(vocab).unsqueeze(0)
    changed = ids.clone()
    changed[0, 1:] = (changed[0, 1:] + 7) % vocab  # every token after the first: the first's logits must not move
    try:
        with torch.inference_mode():
            before = hf(input_ids=ids, use_cache=False).logits[0, 0].float()
            after = hf(input_ids=changed, use_cache=False).logits[0, 0].float()
    except Exception as exc:  # a forward transformers itself cannot run (chunked attention layers): the server's
        # attention check and warm-up generation refuse the model next, naming the reason
        log.info("%s: causality check skipped, the model's forward failed: %s", path, _first_line(exc))
        return
    # A causal model's first logits stay equal, bit for bit in fp32 but for an MoE's expert batches (their shapes
    # follow the other tokens' routing), by a few ulps per layer in half precision (GPU atomics too); an encoder's
    # move with what it reads (a tiny random BERT's by 0.2-0.5%, a trained one's by far more).
    tolerance = 1e-5 if next(hf.parameters()).dtype == torch.float32 else 3e-2
    if (before - after).abs().max() > tolerance * before.abs().max() + 1e-6:
        hint = ", and its config.json has is_decoder false" if getattr(hf.config, "is_decoder", None) is False else ""
        raise UnservableModel(f"{path}: {type(hf).__name__} is not a causal LM: its output for a token changes with "
                              f"the tokens after it (a bidirectional encoder{hint}); this server generates with "
                              f"decoder-only causal LMs")


def load_base_model(model: str, device: str, dtype: str) -> BaseModel:
    """`model` is a local HF causal-LM directory, or `default` for the built-in model. A folder that cannot be
    served as it is raises UnservableModel (no config.json: FileNotFoundError)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = default_model_dir() if model == "default" else Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = _read_config(path)  # first: a broken config.json is named as such, not as the tokenizer's failure
    tokenizer = _read_tokenizer(path)
    hf = _read_weights(path, dtype, config)
    hf.to(device).eval().requires_grad_(False)
    _check_causal(hf, path)
    config = hf.config
    max_context, _ = model_context(config)
    eos = end_of_sequence_ids(config, getattr(hf, "generation_config", None), tokenizer)
    vocab_size = config.get_text_config().vocab_size  # a multimodal config (Gemma-3) keeps it in its text config
    _log_tokens_beyond(tokenizer, vocab_size, path)
    return BaseModel(hf, tokenizer, str(model), config.model_type, vocab_size, int(max_context),
                     frozenset(eos), pad_id(tokenizer, eos, vocab_size), longest_token_chars(tokenizer),
                     SkippedTokens.of(tokenizer))


def pad_id(tokenizer, eos: list[int], vocab_size: int) -> int:
    """The id that fills the pad columns when prompts of different lengths are prefilled together. Those columns
    are masked out of attention (no real query reads their keys, and their own outputs are dropped), so any id the
    embedding has a row for serves, and none needs to mean padding. The tokenizer's pad token where it is within the
    vocabulary, else the first end-of-sequence id that is, else 0: a [PAD] added to the tokenizer without resizing
    the model's embeddings (its id = vocab_size) made every prefill that needed padding fail with an IndexError,
    taking down every request prefilled in that step."""
    pad = tokenizer.pad_token_id
    if pad is not None and 0 <= pad < vocab_size:
        return int(pad)
    chosen = next((i for i in eos if 0 <= i < vocab_size), 0)
    if pad is not None:
        log.warning("the tokenizer's pad token %r (id %d) is outside the model's vocabulary of %d tokens (its "
                    "embedding has no row for it); padding uses id %d instead (pad positions are masked, so any "
                    "valid id serves)", tokenizer.pad_token, pad, vocab_size, chosen)
    return chosen


def _log_tokens_beyond(tokenizer, vocab_size: int, path: Path) -> None:
    """Tokens of the tokenizer that the model has no embedding row for: a text prompt that tokenizes to one is
    refused (server/validation.py). Said once at start, so that the operator knows before users do."""
    if len(tokenizer) <= vocab_size:
        return
    beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= vocab_size)
    if beyond:
        shown = ", ".join(f"{t!r} ({i})" for i, t in beyond[:5]) + (f" and {len(beyond) - 5} more"
                                                                   if len(beyond) > 5 else "")
        log.warning("%s: the tokenizer has %d token%s with ids beyond the model's vocabulary of %d: %s; prompts "
                    "that tokenize to them are refused (INVALID_ARGUMENT)", path, len(beyond),
                    "s" if len(beyond) > 1 else "", vocab_size, shown)


def model_context(config) -> tuple[int, str]:
    """The longest sequence served on this model (prompt and new tokens; training's --max-length is held to it too),
    and where it comes from. A multimodal model's (Gemma-3) is its text model's, as its vocabulary is."""
    text = config.get_text_config()
    whose = "" if text is config else "its text model's "
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(text, key, None):
            stored = getattr(text, "attribute_map", {}).get(key, key)  # the name in the file (GPT-2: n_positions)
            return int(getattr(text, key)), f"{whose}{stored} in its config.json"
    return 2048, "the server's default: its config.json gives neither max_position_embeddings nor n_positions"


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
    text = config.get_text_config()  # a multimodal config may name its ids at the top level, in its text model's, or both
    sources = {"config.json": list(dict.fromkeys(_ids(getattr(config, "eos_token_id", None)) +
                                                 _ids(getattr(text, "eos_token_id", None)))),
               "generation_config.json": _ids(getattr(generation_config, "eos_token_id", None)),
               "tokenizer": _ids(tokenizer.eos_token_id)}
    union = list(dict.fromkeys(i for ids in sources.values() for i in ids))
    log.info("end-of-sequence token ids: %s (%s)", union,
             "; ".join(f"{name}: {ids or 'none'}" for name, ids in sources.items()))
    if not union:
        log.warning("no end-of-sequence token in config.json, generation_config.json or the tokenizer: every "
                    "generation runs to its max_new_tokens or a stop sequence")
    return union

"""The text of a generation is the prompt's continuation, as HF's text-generation pipeline returns it:
decode(prompt + ids) after decode(prompt), streamed without ever taking shown text back. SentencePiece-style
tokenizers (Llama-2, Mistral, Phi-3, T5) drop a first token's leading space when it is decoded alone, and
clean_up_tokenization_spaces rewrites spaces once the next token is known: neither may leak into the stream."""
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from clients.client import Client
from loader.default_model import tiny_config
from server.stopping import FinishReason, StoppingParams, TextStream
from tests.helpers import start_server

WORDS = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁is", "▁Par", "is", "▁", ".", ",", "'", "t", "▁don", "▁stop",
         "!", "▁France", "▁of"]


def metaspace_tokenizer(scheme: str = "first", clean: bool = False) -> PreTrainedTokenizerFast:
    """A SentencePiece-style vocabulary: "▁" marks a word's leading space, which decoding drops at the start."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=clean)


def streamed(tokenizer, prompt: list[int], ids: list[int], stop=()) -> tuple[str, TextStream]:
    stream = TextStream(tokenizer, StoppingParams(len(ids), tuple(stop)), frozenset({2}), prompt)
    text = ""
    for token in ids:
        text += stream.push(token)
        if stream.finish is not None:
            break
    return text, stream


def continuation(tokenizer, prompt: list[int], ids: list[int]) -> str:
    def decode(x):
        return tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return decode(prompt + ids)[len(decode(prompt)):]


def test_a_first_token_keeps_its_leading_space_after_the_prompt():
    tokenizer = metaspace_tokenizer()
    prompt = [1, 3, 4, 5]  # <s> The capital is
    assert tokenizer.decode([6, 7]) == "Paris"  # alone, the space is gone
    text, _ = streamed(tokenizer, prompt, [6, 7, 9])
    assert text == " Paris." == continuation(tokenizer, prompt, [6, 7, 9])
    text, stream = streamed(tokenizer, prompt, [6, 7, 9], stop=[" Paris"])  # a stop with the space matches
    assert (text, stream.finish) == ("", FinishReason.STOP_SEQUENCE)
    assert streamed(tokenizer, [1], [6, 7])[0] == "Paris"  # after BOS alone: what the pipeline gives, no space


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_random_generations_stream_the_continuation_without_cleanup(scheme):
    """With clean_up_tokenization_spaces on, "stop ." became "stop." only once "." came, and a token whose text the
    cleanup shortened ("▁" "▁" ".") was never shown: the stream shows the tokens' text, not the cleanup's guess."""
    tokenizer = metaspace_tokenizer(scheme, clean=True)
    assert tokenizer.decode([14, 8, 9]).endswith("stop.")  # the cleanup is on: it takes back the space before "."
    assert tokenizer.decode([14, 8, 9], clean_up_tokenization_spaces=False).endswith("stop .")
    rng = random.Random(0)
    for _ in range(300):
        prompt = [1] + [rng.randrange(3, len(WORDS)) for _ in range(rng.randint(0, 6))]
        ids = [rng.randrange(3, len(WORDS)) for _ in range(rng.randint(1, 12))]
        assert streamed(tokenizer, prompt, ids)[0] == continuation(tokenizer, prompt, ids), (prompt, ids)


def test_the_server_returns_the_continuation(tmp_path):
    tokenizer = metaspace_tokenizer()
    config = tiny_config("llama", len(WORDS), hidden_size=32, intermediate_size=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    server = start_server(tmp_path, None)
    try:
        with Client(server.target, timeout=60) as client:
            spaced = 0
            for prompt in ["The capital of France is", "The", "is is", "don't stop"]:
                reply = client.generate(prompt, max_new_tokens=8, ignore_eos=True)
                prompt_ids = tokenizer(prompt)["input_ids"]
                assert reply.text == continuation(tokenizer, prompt_ids, list(reply.token_ids)), prompt
                assert "".join(m.text for m in client.generate_stream(prompt, max_new_tokens=8,
                                                                      ignore_eos=True)) == reply.text
                spaced += reply.text.startswith(" ")
            assert spaced  # some continuation starts with a word's space (the comparison is not vacuous)
    finally:
        server.stop()


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2/Mistral's decoding: "▁" for a space, bytes as <0xNN> tokens joined into characters (a run that is not
    UTF-8 becomes one U+FFFD per byte), the text's first space stripped."""
    vocab = ["<unk>", "<s>", "</s>", "▁hello", "▁the", "▁", "▁world", "s"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _bytes(text: str) -> list[int]:
    return [8 + b for b in text.encode()]


@pytest.mark.parametrize("prompt", [
    [1, 3, 5, *_bytes("ж€")],  # the last 4 tokens cut ж's bytes: decoded alone, the run was all U+FFFD
    [1, 3, 2, 2, 2, 2],  # special tokens alone decode to nothing: the first token was decoded as the text's start
    [1, 3, 6, 5, *_bytes("\ufffd")],  # the prompt's text really ends in U+FFFD
    [1, 3, 5, *_bytes("😀")], [1, 3, *_bytes("ж"), 2, 2, 2, 2, *_bytes("€")]])
def test_a_first_token_keeps_its_space_after_any_prompt_ending(prompt):
    """QA: after prompts ending in byte-fallback characters or special tokens, " the" came back "the" (and a stop
    " the" missed it)."""
    tokenizer = byte_fallback_tokenizer()
    assert continuation(tokenizer, prompt, [4, 4]) == " the the"
    assert streamed(tokenizer, prompt, [4, 4])[0] == " the the"
    text, stream = streamed(tokenizer, prompt, [4, 4], stop=[" the"])
    assert (text, stream.finish, len(stream.ids)) == ("", FinishReason.STOP_SEQUENCE, 1)


def test_random_prompts_of_characters_bytes_and_special_tokens_stream_the_continuation():
    tokenizer = byte_fallback_tokenizer()
    rng = random.Random(1)
    pieces = [[3], [4], [5], [6], [7], [1], [2], *(_bytes(c) for c in "ж€😀é\ufffd")]
    for _ in range(300):
        prompt = [1] + [t for _ in range(rng.randint(0, 8)) for t in rng.choice(pieces)]
        # generated: a word first and no U+FFFD's bytes (bytes that continue the prompt's run of bytes, or a run of
        # U+FFFD's, stream as more U+FFFD than they decode to whole: README)
        ids = [rng.choice([3, 4, 5, 6, 7])] + \
            [t for _ in range(rng.randint(0, 5)) for t in rng.choice(pieces[:5] + pieces[7:11])]
        assert streamed(tokenizer, prompt, ids)[0] == continuation(tokenizer, prompt, ids), (prompt, ids)

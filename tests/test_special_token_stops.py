"""A stop sequence that is the text of a special token (one decoding leaves out of the text, such as ChatML's
<|im_end|> where it is no end-of-sequence id) stops when that token is generated; one that holds such a text beside
other text could never match and is refused. Stops are matched against the decoded text, which never holds them."""
import asyncio

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients.client import AsyncClient, Client
from loader.default_model import build_tokenizer, tiny_config
from protos.loraplex.v1 import inference_pb2 as pb
from server.stopping import FinishReason, StoppingParams, TextStream
from tests.helpers import start_server, status_of

IM_END = "<|im_end|>"
PROMPT = "hello"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama whose tokenizer has <|im_end|> as an added special token (not an eos), and whose greedy
    completion of PROMPT is a few text tokens, then <|im_end|> (its LM-head row swapped with the row of the token
    the model would have chosen there), then more. Returns the folder, <|im_end|>'s id and the tokens before it."""
    folder = tmp_path_factory.mktemp("models") / "chat"
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_END]})
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    at = next(k for k in range(2, 8) if greedy[k] not in (*greedy[:k], 2, im_end) and im_end not in greedy[:k])
    with torch.no_grad():
        head = model.lm_head.weight
        head[[greedy[at], im_end]] = head[[im_end, greedy[at]]]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    swapped = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = swapped.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert expected[:at + 1] == greedy[:at] + [im_end] and len(expected) == 8, (greedy, expected)
    return folder, im_end, greedy[:at]


@pytest.fixture(scope="module")
def server(chat_model):
    s = start_server(chat_model[0], None)
    yield s
    s.stop()


def _unary_and_stream(server, **kwargs):
    """The unary reply and the stream's messages of one request, sent together."""
    async def both():
        async with AsyncClient(server.target, timeout=60) as client:
            async def streamed():
                return [m async for m in client.generate_stream(PROMPT, **kwargs)]
            return await asyncio.gather(client.generate(PROMPT, **kwargs), streamed())
    return asyncio.run(both())


def test_a_stop_that_is_a_special_tokens_text_stops_on_that_token(server, chat_model):
    """As other stop sequences: finish STOP_SEQUENCE, the text ends before the stop (the token has no text), and
    token_ids and usage count every generated token, the stopping one last; streamed and unary alike. It used to
    run on to max_new_tokens (LENGTH): the decoded text never holds <|im_end|>."""
    _, im_end, before = chat_model
    tokenizer = AutoTokenizer.from_pretrained(chat_model[0])
    text = tokenizer.decode(before, skip_special_tokens=True)
    for stop in ([IM_END], ["zzz", IM_END]):
        unary, messages = _unary_and_stream(server, max_new_tokens=8, stop=stop)
        assert list(unary.token_ids) == [t for m in messages for t in m.token_ids] == before + [im_end]
        assert unary.text == "".join(m.text for m in messages) == text
        assert unary.finish_reason == messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
        assert unary.usage.completion_tokens == messages[-1].usage.completion_tokens == len(before) + 1
    with Client(server.target, timeout=60) as client:  # without the stop it runs on: the token has no text
        free = client.generate(PROMPT, max_new_tokens=8)
    assert free.finish_reason == pb.FINISH_REASON_LENGTH and list(free.token_ids)[len(before)] == im_end


@pytest.mark.parametrize("stop", [f"{IM_END}\n", f"ok{IM_END}", f" {IM_END} ", "</s>x"])
def test_a_stop_holding_a_special_tokens_text_beside_other_text_is_invalid(server, stop):
    """It could never match (the text never holds the token's text): refused, saying why and what to send."""
    inside = "</s>" if stop.startswith("</s>") else IM_END
    with Client(server.target, timeout=60) as client:
        for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
            code, details = status_of(call, PROMPT, max_new_tokens=4, stop=["fine", stop])
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert f"stopping.stop {stop!r} holds {inside!r}" in details and "never the special token itself" in details, details
            assert f"send {inside!r} as a stop sequence of its own" in details, details


def test_text_before_the_stop_token_is_all_shown_as_at_an_end_of_sequence():
    """Text held back as the start of a text stop, and a character whose bytes never completed (U+FFFD, as
    decoding the ids gives), are shown when a stop token ends the row, as when an end-of-sequence token does."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_END]})
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    for ids, want in [(tokenizer("ab <|im").input_ids, "ab <|im"), (tokenizer("ab😀").input_ids[:4], "ab\ufffd")]:
        params = StoppingParams(20, (IM_END, "xyz"), stop_token_ids=frozenset({im_end}))
        stream = TextStream(tokenizer, params, frozenset({2}))
        shown = "".join(stream.push(t) for t in ids)
        assert stream.finish is None
        shown += stream.push(im_end)
        assert stream.finish is FinishReason.STOP_SEQUENCE and shown == stream.text == want
        assert stream.ids == ids + [im_end]


def test_an_end_of_sequence_token_whose_text_is_a_stop_ends_as_eos_unless_eos_is_ignored():
    tokenizer = build_tokenizer()
    for ignore_eos, reason in [(False, FinishReason.EOS_TOKEN), (True, FinishReason.STOP_SEQUENCE)]:
        stream = TextStream(tokenizer, StoppingParams(5, ("</s>",), ignore_eos, frozenset({2})), frozenset({2}))
        stream.push(70), stream.push(2)
        assert stream.finish is reason

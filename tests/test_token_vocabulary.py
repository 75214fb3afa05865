"""A tokenizer that knows tokens the model has no embedding row for (tokens added to it without resizing the model's
embeddings): padding never uses them, and a text prompt that tokenizes to one is INVALID_ARGUMENT, as an id outside
the vocabulary in prompt_token_ids is; neither takes down the other requests of its prefill step."""
import asyncio
import logging

import grpc
import pytest
from transformers import AutoTokenizer

from clients.client import AsyncClient, Client
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from tests.helpers import scrape, start_server, status_of

VOCAB = 259  # the byte tokenizer's, and the model's embedding rows
EXTRA, PAD = 259, 260  # tokenizer ids beyond them


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny byte-tokenizer Llama whose tokenizer then got '<|extra|>' and a pad token '[PAD]', the embeddings
    left as they were."""
    folder = build_model_dir(tmp_path_factory.mktemp("models") / "oov", "llama", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids(["<|extra|>", "[PAD]"]) == [EXTRA, PAD]
    return folder


@pytest.fixture(scope="module")
def server(folder):
    s = start_server(folder, None)
    yield s
    s.stop()


def test_a_pad_token_beyond_the_vocabulary_is_replaced_by_a_valid_id_and_said_at_start(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="loraplex.model"):
        base = load_base_model(str(folder), "cpu", "float32")
    assert base.vocab_size == VOCAB and base.tokenizer.pad_token_id == PAD
    assert base.pad_token_id == 2  # the first end-of-sequence id: pad columns are masked, any valid id serves
    assert "pad token '[PAD]' (id 260) is outside the model's vocabulary of 259" in caplog.text
    assert "2 tokens with ids beyond the model's vocabulary of 259: '<|extra|>' (259), '[PAD]' (260)" in caplog.text


def _multi_row_prefills(server) -> float:
    samples = scrape(server)
    return (samples['loraplex_batch_size_count{phase="prefill"}']
            - samples['loraplex_batch_size_bucket{le="1.0",phase="prefill"}'])


def test_prompts_of_different_lengths_prefilled_together_are_padded_with_a_valid_id(server):
    """Prompts of different lengths arriving while another request decodes are prefilled in one step, the short
    ones padded: each gets what it gets alone (the pad id was [PAD], beyond the embedding: every such step failed,
    INTERNAL for all its requests)."""
    prompts = ["abc", "a much longer prompt", "de", "a prompt of middling size"]
    with Client(server.target, timeout=60) as client:
        alone = [list(client.generate(p, max_new_tokens=3, ignore_eos=True).token_ids) for p in prompts]

    async def together():
        async with AsyncClient(server.target, timeout=60) as client:
            busy = asyncio.ensure_future(client.generate("x", max_new_tokens=150, ignore_eos=True))
            await asyncio.sleep(0.3)  # the engine is decoding: the prompts below queue up and join in one prefill
            replies = await asyncio.gather(*[client.generate(p, max_new_tokens=3, ignore_eos=True) for p in prompts],
                                           return_exceptions=True)
            return replies, await asyncio.gather(busy, return_exceptions=True)
    for _ in range(3):  # until some prefill step really held several of them
        before = _multi_row_prefills(server)
        replies, busy = asyncio.run(together())
        errors = [f"{r.code().name}: {r.details()}" for r in replies + busy if isinstance(r, grpc.RpcError)]
        assert not errors, errors
        assert [list(r.token_ids) for r in replies] == alone
        if _multi_row_prefills(server) > before:
            break
    else:
        pytest.fail("the prompts were never prefilled together: the test did not pad")


@pytest.mark.parametrize("prompt,token,token_id", [("hi [PAD]", "[PAD]", PAD), ("<|extra|> hi", "<|extra|>", EXTRA)])
def test_a_text_prompt_holding_a_token_beyond_the_vocabulary_is_invalid(server, prompt, token, token_id):
    """Named as prompt_token_ids holding such an id are, with the token's text, its id and the vocabulary size; in
    a stream too. It used to reach the engine and fail the whole prefill step it ran in (INTERNAL)."""
    with Client(server.target, timeout=60) as client:
        assert client.server_info().vocab_size == VOCAB
        for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
            code, details = status_of(call, prompt, max_new_tokens=3)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert f"{token!r} (id {token_id})" in details and "vocabulary has 259 tokens" in details, details
            assert "leave that text out of the prompt" in details
        code, details = status_of(client.generate, [5, token_id], max_new_tokens=3)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and str(token_id) in details and "259" in details


def test_a_request_beside_one_holding_a_token_beyond_the_vocabulary_is_served(server):
    """Sent together while another request decodes, so that both would be prefilled in one step."""
    with Client(server.target, timeout=60) as client:
        expected = list(client.generate("innocent", max_new_tokens=3, ignore_eos=True).token_ids)

    async def together():
        async with AsyncClient(server.target, timeout=60) as client:
            busy = asyncio.ensure_future(client.generate("x", max_new_tokens=100, ignore_eos=True))
            await asyncio.sleep(0.3)
            replies = await asyncio.gather(client.generate("innocent", max_new_tokens=3, ignore_eos=True),
                                           client.generate("hi [PAD]", max_new_tokens=3), return_exceptions=True)
            return replies, await busy
    (innocent, bad), busy = asyncio.run(together())
    assert list(innocent.token_ids) == expected and len(busy.token_ids) == 100
    assert isinstance(bad, grpc.RpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_training_pads_with_a_valid_id_and_refuses_a_line_that_tokenizes_beyond_the_vocabulary(folder, tmp_path):
    """Training padded with the tokenizer's pad id too, and fed the model whatever the data tokenized to: an
    IndexError in the first step."""
    import json

    from adapters.training import TrainSettings
    from loader.train_data import DataError
    from loader.train_job_spec import TrainJob
    from loader.training_job import run_job
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "ab" * (1 + i % 5)}) + "\n" for i in range(8)))  # lengths differ
    job = TrainJob(method="lora", data=str(data), out=str(tmp_path / "o"), model=str(folder),
                   target_modules=["q_proj"], settings=TrainSettings(batch_size=4, max_steps=2))
    assert run_job(job)["steps"] == 2
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "x <|extra|> y"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: tokenizes to '<\|extra\|>' \(id 259\), a token the tokenizer "
                                        r"knows but the model does not: its vocabulary has 259 tokens"):
        run_job(TrainJob(**{**job.__dict__, "out": str(tmp_path / "o2")}))

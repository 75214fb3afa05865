"""GenerateRequest.response_format: outputs held to a JSON Schema, any JSON object, a regex, a choice or a Lark grammar,
through the real server; the same rows alone and in mixed batches; greedy choice against a mask computed here."""
import asyncio
import json
import re
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from llguidance import LLParserLimits
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients.arguments import build_request
from clients.client import AsyncClient, Client
from loader.default_model import build_model_dir
from protos.loraplex.v1 import inference_pb2 as pb
from server import format_masks, response_format
from server.errors import FailedPrecondition, InvalidArgument
from server.format_masks import apply_masks
from server.response_format import Formats, format_of
from tests.helpers import make_peft_adapter, scrape, start_server, status_of

C = grpc.StatusCode
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 5},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
COLOURS = ["red", "green", "blue"]
PAIR = 'start: "(" NUM "," NUM ")"\nNUM: /[0-9]{1,3}/'


def _person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "ok", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 5
            and type(value["age"]) is int and 0 <= value["age"] <= 120 and isinstance(value["ok"], bool)
            and len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"}
            and text == json.dumps(value, ensure_ascii=False))  # separated as json.dumps writes it


FORMATS = {  # keyword -> (value, whether a complete output satisfies it)
    "json_schema": (PERSON, _person),
    "regex": (REGEX, lambda text: re.fullmatch(REGEX, text) is not None),
    "choice": (COLOURS, lambda text: text in COLOURS),
    "grammar": (PAIR, lambda text: re.fullmatch(r"\([0-9]{1,3},[0-9]{1,3}\)", text) is not None),
    "json_object": (True, lambda text: isinstance(json.loads(text), dict)),
}


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    make_peft_adapter(model_dirs["llama"], root / "a", 5, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    server = start_server(model_dirs["llama"], root)
    yield server
    server.stop()


@pytest.mark.parametrize("kind", FORMATS)
def test_outputs_hold_to_their_format_greedy_and_sampled(served, kind):
    value, holds = FORMATS[kind]
    with Client(served.target, timeout=60) as client:
        assert client.server_info().response_format
        for extra in ({}, *({"temperature": 1.0, "seed": s} for s in range(4))):
            for adapter in ("", "a"):
                reply = client.generate("hello there", adapter, max_new_tokens=120, **{kind: value}, **extra)
                if kind == "json_object" and reply.finish_reason == pb.FINISH_REASON_LENGTH:
                    assert reply.text.startswith("{")  # (any object: a random model may write one past 120 tokens)
                    continue
                assert reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN, (extra, adapter, reply.text)
                assert holds(reply.text), (extra, adapter, reply.text)


def test_a_formatted_row_gets_alone_what_it_gets_in_a_mixed_batch(served):
    """Formats of every kind, free text, the base model and an adapter, greedy and seeded, all in one batch."""
    cases = [dict(prompt=p, adapter_id=a, max_new_tokens=40, **kw) for p, a, kw in [
        ("hello there", "", dict(json_schema=PERSON)), ("hello there", "a", dict(json_schema=PERSON)),
        ("one two", "", dict(regex=REGEX)), ("one two", "a", dict(choice=COLOURS, temperature=1.0, seed=7)),
        ("x", "", dict(grammar=PAIR, temperature=0.7, seed=3)), ("hello there", "", {}),
        ("hello there", "a", dict(ignore_eos=True)), ("x", "", dict(json_object=True, temperature=1.0, seed=1))]]
    with Client(served.target, timeout=60) as client:
        alone = [client.generate(**case) for case in cases]

    async def together():
        async with AsyncClient(served.target, timeout=60) as client:
            return await asyncio.gather(*(client.generate(**case) for case in cases))
    for case, one, joint in zip(cases, alone, asyncio.run(together())):
        assert list(joint.token_ids) == list(one.token_ids), case
        assert joint.finish_reason == one.finish_reason


def _oracle_choice(model_dir, prompt: list[int], choices: list[str], steps: int) -> list[int]:
    """Greedy decoding with HF's model, the mask computed here: a token is allowed where the text so far plus its
    own stays a prefix of a choice; the end of the sequence where the text is one."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    pieces = {t: tokenizer.decode([t]) for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids}
    ids, text, out = list(prompt), "", []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        allowed = [t for t, piece in pieces.items() if piece and any(c.startswith(text + piece) for c in choices)]
        allowed += [eos] * (text in choices)
        token = max(allowed, key=lambda t: logits[t].item())
        out.append(token)
        if token == eos:
            return out
        ids.append(token)
        text += pieces[token]
    return out


def test_greedy_choice_equals_a_mask_computed_here(served, model_dirs):
    choices = ["al", "alpha", "alphabet", "beta", "gamma ray"]  # "al" is whole while "alpha" goes on
    for prompt in ([5, 80, 99, 12], [40, 41, 42], [200, 7]):
        with Client(served.target, timeout=60) as client:
            reply = client.generate(prompt, "", max_new_tokens=16, choice=choices)
        expected = _oracle_choice(model_dirs["llama"], prompt, choices, 16)
        assert list(reply.token_ids) == expected
        assert reply.text in choices


def test_log_probabilities_stay_the_models_own(served):
    with Client(served.target, timeout=60) as client:
        free = client.generate("hello there", "", max_new_tokens=1, logprobs=5)
        held = client.generate("hello there", "", max_new_tokens=1, logprobs=5, choice=["zzz"])
    assert held.text == "z" and free.text != "z"
    assert list(held.logprobs[0].top_token_ids) == list(free.logprobs[0].top_token_ids)
    assert held.logprobs[0].top_logprobs == pytest.approx(free.logprobs[0].top_logprobs, abs=1e-5)
    assert held.logprobs[0].logprob < free.logprobs[0].logprob  # z's own, unmasked and unrenormalized


def test_a_stream_holds_to_the_format_as_a_unary_call(served):
    with Client(served.target, timeout=60) as client:
        unary = client.generate("hello there", "a", max_new_tokens=120, json_schema=PERSON)
        parts = list(client.generate_stream("hello there", "a", max_new_tokens=120, json_schema=PERSON))
    assert "".join(p.text for p in parts) == unary.text and _person(unary.text)
    assert parts[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN


def test_max_new_tokens_and_stop_sequences_still_end_a_formatted_output(served):
    with Client(served.target, timeout=60) as client:
        cut = client.generate("hello there", "", max_new_tokens=4, json_schema=PERSON)
        stopped = client.generate("hello there", "", max_new_tokens=60, json_schema=PERSON, stop='"age"')
    assert cut.finish_reason == pb.FINISH_REASON_LENGTH and cut.text == '{"na'
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and stopped.text.startswith('{"name": "')


def _sent(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="hello", response_format=pb.ResponseFormat(**fields))


@pytest.mark.parametrize("request_, code, words", [
    (_sent(regex="("), C.INVALID_ARGUMENT, "response_format.regex does not compile: "),
    (_sent(grammar="start: foo"), C.INVALID_ARGUMENT, 'response_format.grammar does not compile: at 1(8): unknown name'),
    (_sent(json_schema="{bad"), C.INVALID_ARGUMENT, "response_format.json_schema is not JSON"),
    (_sent(json_schema="[1, 2]"), C.INVALID_ARGUMENT,
     "response_format.json_schema must be a JSON object, not [1, 2]"),
    (_sent(json_schema="true"), C.INVALID_ARGUMENT, "response_format.json_schema must be a JSON object, not true"),
    (_sent(json_schema='{"items": ' * 2000 + "{}" + "}" * 2000), C.INVALID_ARGUMENT, "nested too deeply"),
    (_sent(regex="[^\\s\\S]"), C.INVALID_ARGUMENT, "response_format.regex allows no token here"),
    (_sent(json_schema='{"type": "nonsense"}'), C.INVALID_ARGUMENT, "response_format.json_schema does not compile"),
    (_sent(choice=pb.Choices()), C.INVALID_ARGUMENT, "response_format.choice takes 1 to 1024 strings, got 0"),
    (_sent(choice=pb.Choices(choices=["a", ""])), C.INVALID_ARGUMENT, "response_format.choice[1] is empty"),
    (_sent(choice=pb.Choices(choices=["x"] * 1025)), C.INVALID_ARGUMENT, "got 1025"),
    (_sent(regex="a" * 65537), C.INVALID_ARGUMENT, "response_format.regex is 65537 characters long; at most 65536"),
    (pb.GenerateRequest(prompt="hello", stopping=pb.StoppingCriteria(ignore_eos=True),
                        response_format=pb.ResponseFormat(regex="a+")), C.INVALID_ARGUMENT, "stopping.ignore_eos"),
    (pb.GenerateRequest(prompt="hello", stopping=pb.StoppingCriteria(min_new_tokens=2),
                        response_format=pb.ResponseFormat(regex="a+")), C.INVALID_ARGUMENT, "stopping.min_new_tokens"),
])
def test_bad_formats_are_refused_naming_the_field(served, request_, code, words):
    with Client(served.target, timeout=60) as client:
        got, details = status_of(client.inference.Generate, request_)
        assert (got, words in details) == (code, True), details
        assert client.generate("hello", "", max_new_tokens=3, regex="[a-c]+").text  # the server goes on


def test_an_unset_or_false_json_object_is_free_text(served):
    with Client(served.target, timeout=60) as client:
        free = client.generate("hello", "", max_new_tokens=8, ignore_eos=True)
        for fmt in (pb.ResponseFormat(), pb.ResponseFormat(json_object=False)):
            reply = client.inference.Generate(pb.GenerateRequest(
                prompt="hello", response_format=fmt,
                stopping=pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True)))
            assert list(reply.token_ids) == list(free.token_ids)


def test_a_format_that_fails_mid_way_fails_its_request_alone(served, monkeypatch):
    """A grammar that goes past llguidance's per-step limits after its first token (at the default limits, a
    pathological grammar): that request fails, INVALID_ARGUMENT with llguidance's reason; its batch-mate goes on."""
    monkeypatch.setattr(response_format, "LIMITS", LLParserLimits(step_max_items=3, verbose_errors=False))

    async def both():
        async with AsyncClient(served.target, timeout=60) as client:
            return await asyncio.gather(client.generate("hello", "", max_new_tokens=20, json_schema={"type": "array"}),
                                        client.generate("hello", "a", max_new_tokens=20, ignore_eos=True),
                                        return_exceptions=True)
    failed, fine = asyncio.run(both())
    assert failed.code() == C.INVALID_ARGUMENT
    assert "response_format could not be followed: parser error: Too many items (limit 3" in failed.details()
    assert len(fine.token_ids) == 20


def test_each_request_compiles_its_own_matcher_and_refused_sources_are_remembered(model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    formats = Formats(tokenizer, frozenset({tokenizer.eos_token_id}), len(tokenizer))
    request = pb.GenerateRequest(response_format=pb.ResponseFormat(choice=pb.Choices(choices=["ab", "cd"])))
    first, second = (formats.matcher(*format_of(request)) for _ in range(2))
    assert first.consume_token(tokenizer.convert_tokens_to_ids("a"))
    assert not first.is_accepting() and second.consume_token(tokenizer.convert_tokens_to_ids("c"))
    bad = pb.GenerateRequest(response_format=pb.ResponseFormat(regex="[unclosed"))
    with pytest.raises(InvalidArgument, match="does not compile") as refused:
        formats.matcher(*format_of(bad))
    assert list(formats._refused.values()) == [str(refused.value)]
    with pytest.raises(FailedPrecondition, match="not a fast"):
        Formats(object(), frozenset({2}), 10).matcher(*format_of(request))
    with pytest.raises(FailedPrecondition, match="no end-of-sequence token"):
        Formats(tokenizer, frozenset({10 ** 6}), len(tokenizer)).matcher(*format_of(request))
    beyond = Formats(tokenizer, frozenset({tokenizer.eos_token_id}), len(tokenizer) - 1)
    assert "more than its vocabulary's" in beyond.problem


def test_a_format_too_costly_to_follow_is_refused_before_it_reaches_the_batch(served):
    """13 characters whose first token takes llguidance ~0.4 s of CPU and every later one ~80 ms (every row of the
    batch would wait for it): refused when the request is prepared, and at once when sent again."""
    with Client(served.target, timeout=60) as client:
        code, details = status_of(client.generate, "hello", "", regex="(a{500}){500}")
        assert code == C.INVALID_ARGUMENT and "ms of CPU to decide the first token, more than 100" in details
        start = time.monotonic()
        assert status_of(client.generate, "hello", "", regex="(a{500}){500}") == (code, details)
        assert time.monotonic() - start < 0.1


def test_the_memory_a_refused_format_took_is_given_back(served):
    """A hostile regex's first mask builds ~50-100 MB of lexer states on the compiling thread; once refused they are
    freed and given back to the system (glibc kept them in that thread's arena: four such regexes left the server's
    RSS 190-270 MB up, and 8 on a 32000-token vocabulary ~1 GB)."""
    def rss_mb() -> float:  # (the server runs in this process)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    with Client(served.target, timeout=60) as client:
        client.generate("hello", "", max_new_tokens=2, regex="[a-z]+")  # llguidance's tokenizer built
        before = rss_mb()
        for i in range(4):  # distinct sources: a refused one is not compiled again
            assert status_of(client.generate, "hello", "", regex=f"(a{{700}}){{700}}b{{{i}}}")[0] == C.INVALID_ARGUMENT
        assert rss_mb() - before < 100


def test_a_row_whose_mask_costs_too_much_fails_alone(served, monkeypatch):
    monkeypatch.setattr(format_masks, "MAX_MASK_CPU", -1.0)  # every mask over it

    async def both():
        async with AsyncClient(served.target, timeout=60) as client:
            return await asyncio.gather(client.generate("hello", "", max_new_tokens=20, regex="[ab]+"),
                                        client.generate("hello", "a", max_new_tokens=20, ignore_eos=True),
                                        return_exceptions=True)
    failed, fine = asyncio.run(both())
    assert failed.code() == C.INVALID_ARGUMENT and "ms of CPU to decide a token, more than -1000" in failed.details()
    assert len(fine.token_ids) == 20


def test_an_end_id_a_format_takes_as_text_ends_nothing(tmp_path):
    """A model whose configs list an ordinary token (".") as an end of sequence: a format that needs "." mid-way
    goes on past it; the output ends (EOS_TOKEN) only where complete."""
    model = build_model_dir(tmp_path / "model", "llama", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(model)
    dot = tokenizer.convert_tokens_to_ids(".")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "eos_token_id": [config["eos_token_id"], dot]}))
    server = start_server(model, None)
    try:
        with Client(server.target, timeout=60) as client:
            for seed in range(6):
                reply = client.generate("hi", "", max_new_tokens=40, regex=r"[a-z]{1,4}\.[a-z]{1,4}",
                                        temperature=1.0, seed=seed)
                assert reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN
                assert re.fullmatch(r"[a-z]{1,4}\.[a-z]{1,4}", reply.text), reply.text
    finally:
        server.stop()


def test_the_client_sends_one_format_and_names_a_bad_one():
    request = build_request("hi", json_schema={"type": "object"})
    assert json.loads(request.response_format.json_schema) == {"type": "object"}
    assert build_request("hi", choice=("a", "b")).response_format.choice.choices == ["a", "b"]
    assert not build_request("hi").HasField("response_format")
    with pytest.raises(ValueError, match="regex and choice: a request takes one response format"):
        build_request("hi", regex="a", choice=["b"])
    with pytest.raises(TypeError, match="choice must be a sequence of str"):
        build_request("hi", choice="ab")
    with pytest.raises(TypeError, match="json_schema must be a dict or its JSON text"):
        build_request("hi", json_schema=True)
    with pytest.raises(TypeError, match="json_object must be True or False"):
        build_request("hi", json_object="yes")


def test_the_command_line_holds_the_output_to_a_format(served, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    for flags, holds in ((["--json-schema", str(schema)], _person), (["--choice", "red", "--choice", "blue"],
                                                                       lambda text: text in ("red", "blue"))):
        run = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "--target", served.target, "hello",
                              "--max-new-tokens", "120", *flags], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert holds(run.stdout.removesuffix("\n")) and "[eos_token;" in run.stderr
    run = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "--target", served.target, "hello",
                          "--regex", "a", "--choice", "b"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "not allowed with argument --regex" in run.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3]])
def test_the_masks_set_exactly_the_disallowed_logits_to_minus_infinity(dtype, rows):
    g = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word's high bits lie beyond the vocabulary
    logits = torch.randn(4, vocab, generator=g).to(dtype)
    allowed = torch.rand(len(rows), vocab, generator=g) < 0.5
    bits = torch.from_numpy(np.packbits(allowed.numpy(), axis=1, bitorder="little"))  # little-endian int32 words
    bits = torch.nn.functional.pad(bits, (0, (-bits.shape[1]) % 4)).view(torch.int32)
    expected = logits.clone()
    for k, i in enumerate(rows):
        expected[i][~allowed[k]] = float("-inf")
    apply_masks(logits, rows, bits)
    assert torch.equal(logits, expected)


def test_formatted_requests_and_compiles_are_counted_by_kind(served):
    requests, compiles = ('loraplex_response_format_requests_total{format="regex"}',
                          'loraplex_response_format_compile_seconds_count{format="regex"}')
    before = scrape(served)
    with Client(served.target, timeout=60) as client:
        for _ in range(3):
            client.generate("hello", "", max_new_tokens=4, regex="[xyz]{2,9}")
        for _ in range(2):
            status_of(client.generate, "hello", "", regex="[unclosed")
    after = scrape(served)
    assert after[requests] - before.get(requests, 0) == 5
    assert after[compiles] - before.get(compiles, 0) == 4  # each request's own; the refused source once

"""Chat requests: the model's chat template makes the prompt, as HF apply_chat_template(sanitize_control_tokens=True)
does, so a message's text never becomes a control token; a model without a template, or a template that refuses the
messages, is a clear refusal."""
import json
import random
import re
import string

import grpc
import pytest
from transformers import AutoTokenizer

from clients.cli import main
from clients.client import Client
from loader.train_data import IGNORE, DataError, read_jsonl
from loader.training_job import run_job
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import start_server, status_of, training_job

TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token + 'assistant: ' }}{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi </s> there"}]


@pytest.fixture(scope="module")
def chat_model(model_dirs, tmp_path_factory):
    """The llama test model with a chat template (written as HF writes one: chat_template.jinja)."""
    out = tmp_path_factory.mktemp("chat") / "m"
    out.mkdir()
    for f in model_dirs["llama"].iterdir():
        (out / f.name).symlink_to(f)
    (out / "tokenizer_config.json").unlink()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out, tokenizer


def test_a_chat_is_the_prompt_hf_makes_of_it_with_control_tokens_only_from_the_template(chat_model, capsys):
    model_dir, tokenizer = chat_model
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False,
                                             sanitize_control_tokens=True)
    unsanitized = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(unsanitized) == len(expected) - 3  # the message's "</s>" is 4 byte tokens here, not the eos token
    server = start_server(model_dir, None)
    try:
        with Client(server.target, timeout=60) as client:
            assert client.server_info().chat_template
            chat = client.generate(CHAT, max_new_tokens=8, ignore_eos=True)
            ids = client.generate(expected, max_new_tokens=8, ignore_eos=True)
            assert list(chat.token_ids) == list(ids.token_ids) and chat.text == ids.text
            assert chat.usage.prompt_tokens == len(expected)
            streamed = list(client.generate_stream(CHAT, max_new_tokens=8, ignore_eos=True))
            assert [t for m in streamed for t in m.token_ids] == list(ids.token_ids)
            # continue_final_message: the prompt ends inside the last message, as HF makes it
            partial = CHAT + [{"role": "assistant", "content": "well"}]
            continued = tokenizer.apply_chat_template(partial, continue_final_message=True, tokenize=True,
                                                      return_dict=False, sanitize_control_tokens=True)
            got = client.generate(partial, max_new_tokens=4, ignore_eos=True, continue_final_message=True)
            assert got.usage.prompt_tokens == len(continued) and list(got.token_ids) == \
                list(client.generate(continued, max_new_tokens=4, ignore_eos=True).token_ids)
            with pytest.raises(SystemExit) as exited:  # the command line's --system and --chat
                main(["generate", "--target", server.target, CHAT[1]["content"], "--system", CHAT[0]["content"],
                      "--max-new-tokens", "8", "--ignore-eos"])
            assert exited.value.code == 0 and capsys.readouterr().out == chat.text + "\n"
            code, details = status_of(client.generate, [{"role": "tool", "content": "x"}])
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown role tool" in details, details
            code, details = status_of(client.generate, [{"role": "user", "content": "x" * 5000}])
            assert code == grpc.StatusCode.OUT_OF_RANGE
            assert "the chat's roles and contents have 5004 characters" in details
    finally:
        server.stop()


def test_a_model_without_a_chat_template_refuses_a_chat_naming_the_alternatives(model_dirs):
    server = start_server(model_dirs["llama"], None)
    try:
        with Client(server.target, timeout=60) as client:
            assert not client.server_info().chat_template
            code, details = status_of(client.generate, CHAT)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "no chat template" in details, details
            assert "send prompt or prompt_token_ids" in details
    finally:
        server.stop()


@pytest.mark.parametrize("prompt,kwargs,needle", [
    ([{"role": "user"}], {}, "chat message 0 must be a dict of exactly 'role' and 'content'"),
    ([{"role": "user", "content": 5}], {}, "chat message 0 content"),
    ("hi", dict(continue_final_message=True), "continue_final_message applies to chat messages only"),
])
def test_the_client_checks_chat_messages(prompt, kwargs, needle):
    from clients.arguments import build_request
    with pytest.raises(TypeError, match=needle):
        build_request(prompt, **kwargs)


TURNS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi </s>"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
         {"role": "assistant", "content": "bye"}]


def test_a_chat_example_learns_the_assistants_turns_as_the_template_writes_them(chat_model, tmp_path):
    model_dir, tokenizer = chat_model
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": TURNS}) + "\n")
    [example] = read_jsonl(path, tokenizer, 512)
    assert example.input_ids == tokenizer.apply_chat_template(TURNS, tokenize=True, return_dict=False,
                                                               sanitize_control_tokens=True)
    assert all(label in (IGNORE, t) for t, label in zip(example.input_ids, example.labels))
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    # each assistant turn's content and the end of its turn (here the eos token), nothing of the others
    assert tokenizer.decode(learned) == "hello</s>bye</s>"


@pytest.mark.parametrize("record,needle", [
    ({"messages": TURNS, "text": "x"}, "has 'messages' and 'text'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 0 must be an object of exactly 'role' and 'content'"),
    ({"messages": TURNS[:2]}, "the chat has no assistant message to learn from"),
    ({"messages": TURNS[2:3]}, "the chat starts with an assistant message"),
    ({"messages": [{"role": "tool", "content": "x"}, TURNS[2]]}, "refused these messages (TemplateError: unknown role"),
])
def test_bad_chat_examples_are_refused_naming_the_line(chat_model, tmp_path, record, needle):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(needle)):
        read_jsonl(path, chat_model[1], 512)


def test_chat_examples_need_the_models_chat_template(model_dirs, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": TURNS}) + "\n")
    with pytest.raises(DataError, match="no chat template .*; give prompt and completion instead"):
        read_jsonl(path, AutoTokenizer.from_pretrained(model_dirs["llama"]), 512)


def test_an_adapter_trained_on_chats_answers_a_served_chat(chat_model, tmp_path):
    """Train on chats whose assistant always answers "ok", then ask the served adapter in a chat of a new word."""
    model_dir, _ = chat_model
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(80)]
    for name, part in (("train", words[:64]), ("eval", words[64:79])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "ok"}]}) + "\n"
            for w in part))
    run_job(training_job({"llama": model_dir}, (tmp_path / "train.jsonl", tmp_path / "eval.jsonl"),
                         tmp_path / "adapters" / "ok", "lora"))
    server = start_server(model_dir, tmp_path / "adapters")
    try:
        with Client(server.target, timeout=60) as client:
            chat = [{"role": "user", "content": words[79]}]
            reply = client.generate(chat, "ok", max_new_tokens=8)
            assert reply.text == "ok" and reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN
            assert client.generate(chat, max_new_tokens=8).text != "ok"
    finally:
        server.stop()

"""What the server takes from a --model folder: the tokens that end a generation, and the folders it refuses to
serve (not a complete decoder-only causal LM) with a one-line error at start-up."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from clients.client import Client
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import start_server


@pytest.fixture(scope="module")
def multi_eos(tmp_path_factory):
    """A model whose generation_config.json (not config.json, eos 2) also ends on the third greedy token of
    'hello', as instruct models list their end-of-turn ids; and what HF generate makes of it."""
    folder = build_model_dir(tmp_path_factory.mktemp("models") / "multi_eos", "llama", seed=3)
    ids = AutoTokenizer.from_pretrained(folder)("hello", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    end = greedy[2]
    assert end not in (2, *greedy[:2]), greedy  # the seed makes the third token the first end
    generation = GenerationConfig.from_pretrained(folder)
    generation.eos_token_id = [2, end]
    generation.save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert expected == greedy[:3]  # HF generate stops on generation_config.json's ids
    return folder, expected


def test_generation_config_eos_ids_end_a_generation_as_hf_generate_does(multi_eos, caplog):
    folder, expected = multi_eos
    with caplog.at_level(logging.INFO, logger="loraplex.model"):
        base = load_base_model(str(folder), "cpu", "float32")
    assert base.eos_token_ids == {2, expected[-1]}
    assert f"end-of-sequence token ids: [2, {expected[-1]}]" in caplog.text  # the set in force, logged at start
    server = start_server(folder, None)
    try:
        with Client(server.target, timeout=60) as client:
            reply = client.generate("hello", max_new_tokens=10)
        assert list(reply.token_ids) == expected
        assert reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    finally:
        server.stop()


def test_the_tokenizer_eos_counts_beside_the_configs(tmp_path):
    folder = build_model_dir(tmp_path / "m", "llama", seed=1, eos_token_id=[2, 7])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(9)
    tokenizer.save_pretrained(folder)
    assert load_base_model(str(folder), "cpu", "float32").eos_token_ids == {2, 7, 9}

"""GenerateRequest.logprobs: each generated token's log-probability and its step's most likely tokens', under the
model's own distribution with the request's adapter, equal to what HF/PEFT compute for the same tokens, whatever
else shares the batch, streamed as returned whole; and GenerateRequest.prompt_logprobs, the same for the prompt's
tokens (in the batch runner: tests/test_prompt_logprobs.py)."""
import concurrent.futures

import grpc
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients.client import Client
from tests.helpers import (assert_logprobs_close, lora_root, scrape, slow_decode, start_server, status_of,
                           wait_for)

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    return lora_root(model_dirs, tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=8)
    yield server
    server.stop()


def _reference(model, generated: list[int], top: int) -> list[tuple[float, list[int], list[float]]]:
    """HF's log-softmax of the next-token logits after PROMPT + each generated prefix, at each step."""
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + generated])).logits[0, len(PROMPT) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    values, ids = logp.topk(top, dim=-1)
    return [(logp[i, t].item(), ids[i].tolist(), values[i].tolist()) for i, t in enumerate(generated)]


def _assert_matches(reply, expected, tolerance=1e-4):
    assert len(reply.logprobs) == len(reply.token_ids) == len(expected)
    assert_logprobs_close(reply.logprobs, expected, tolerance)


@pytest.mark.parametrize("adapter_id", ["", "a"])
def test_logprobs_equal_hf_and_peft_for_greedy_and_sampled_tokens(server, model_dirs, adapter_root, adapter_id):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    if adapter_id:
        model = PeftModel.from_pretrained(model, adapter_root / adapter_id).eval()
    with Client(server.target, timeout=60) as client:
        greedy = client.generate(PROMPT, adapter_id, max_new_tokens=8, ignore_eos=True, logprobs=5)
        sampled = client.generate(PROMPT, adapter_id, max_new_tokens=8, ignore_eos=True, logprobs=3,
                                  temperature=1.5, top_k=4, seed=11)  # before temperature and top-k
    _assert_matches(greedy, _reference(model, list(greedy.token_ids), 5))
    assert all(lp.top_token_ids[0] == t for lp, t in zip(greedy.logprobs, greedy.token_ids))  # greedy: the top one
    _assert_matches(sampled, _reference(model, list(sampled.token_ids), 3))


def test_logprobs_in_a_mixed_batch_equal_alone_and_streamed_equal_unary(server, monkeypatch):
    def rows_beyond_one():  # decode steps' rows past the first, over the server's life: grows once rows share a step
        found = scrape(server)
        return found['loraplex_batch_size_sum{phase="decode"}'] - found['loraplex_batch_size_count{phase="decode"}']
    slow_decode(server, monkeypatch)  # the concurrent requests overlap
    with Client(server.target, timeout=60) as client:
        alone = client.generate(PROMPT, "a", max_new_tokens=12, ignore_eos=True, logprobs=2)
        chosen_only = client.generate(PROMPT, "a", max_new_tokens=12, ignore_eos=True, logprobs=0)
        none = client.generate(PROMPT, "a", max_new_tokens=12, ignore_eos=True)
        streamed = list(client.generate_stream(PROMPT, "a", max_new_tokens=12, ignore_eos=True, logprobs=2))
        shared = rows_beyond_one()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # rows for the base model and the adapter, with and
            others = [pool.submit(client.generate, [9 + i] * (3 + i), "a" if i % 2 else "", max_new_tokens=16,
                                  ignore_eos=True, logprobs=(i if i % 3 else None)) for i in range(5)]
            together = pool.submit(client.generate, PROMPT, "a", max_new_tokens=12, ignore_eos=True, logprobs=2)
            assert all(len(f.result().token_ids) == 16 for f in others)  # without logprobs
            together = together.result()
    assert rows_beyond_one() > shared  # they did share steps
    assert list(together.token_ids) == list(alone.token_ids) == list(none.token_ids)
    for a, b in zip(together.logprobs, alone.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert list(a.top_token_ids) == list(b.top_token_ids)
        assert list(a.top_logprobs) == pytest.approx(list(b.top_logprobs), abs=1e-5)
    assert not none.logprobs
    assert [lp.logprob for lp in chosen_only.logprobs] == [lp.logprob for lp in alone.logprobs]
    assert all(not lp.top_token_ids and not lp.top_logprobs for lp in chosen_only.logprobs)
    assert [t for m in streamed for t in m.token_ids] == list(alone.token_ids)
    assert [lp for m in streamed for lp in m.logprobs] == list(alone.logprobs)
    assert all(len(m.logprobs) == len(m.token_ids) for m in streamed)


def test_too_many_alternatives_are_refused(server):
    with Client(server.target, timeout=60) as client:
        code, message = status_of(client.generate, PROMPT, max_new_tokens=2, logprobs=21)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "logprobs must be at most 20" in message


def test_more_alternatives_than_the_vocabulary_holds_are_all_of_it():
    """QA: logprobs=20 on a model of 12 tokens failed the request (and its prefill group) INTERNAL."""
    from server.logprobs import token_logprobs
    logits = torch.randn(2, 12)
    found = token_logprobs(logits, [3, 4], [20, None])
    assert sorted(found[0].top_token_ids) == list(range(12)) and found[1] is None
    assert found[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[3].item(), abs=1e-6)


def _prompt_reference(model, prompt, top):
    """HF's log-softmax at each position of the prompt, for the token after it."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    values, ids = logp.topk(top, dim=-1)
    return [(logp[i, t].item(), ids[i].tolist(), values[i].tolist()) for i, t in enumerate(prompt[1:])]


@pytest.mark.parametrize("adapter_id", ["", "a"])
def test_prompt_logprobs_equal_hf_and_peft(server, model_dirs, adapter_root, adapter_id):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    if adapter_id:
        model = PeftModel.from_pretrained(model, adapter_root / adapter_id).eval()
    with Client(server.target, timeout=60) as client:
        reply = client.generate(PROMPT, adapter_id, max_new_tokens=3, ignore_eos=True, prompt_logprobs=4,
                                logprobs=2)
        plain = client.generate(PROMPT, adapter_id, max_new_tokens=3, ignore_eos=True)
    assert list(reply.prompt_token_ids) == PROMPT
    assert_logprobs_close(reply.prompt_logprobs, _prompt_reference(model, PROMPT, 4), 1e-4)
    assert list(reply.token_ids) == list(plain.token_ids) and len(reply.logprobs) == 3
    assert not plain.prompt_token_ids and not plain.prompt_logprobs


def test_prompt_logprobs_in_a_mixed_batch_equal_alone_and_streamed_equal_unary(server, model_dirs, monkeypatch):
    def prefill_rows_beyond_one():
        found = scrape(server)
        return (found['loraplex_batch_size_sum{phase="prefill"}']
                - found['loraplex_batch_size_count{phase="prefill"}'])
    with Client(server.target, timeout=60) as client:
        alone = client.generate(PROMPT, "a", max_new_tokens=4, ignore_eos=True, prompt_logprobs=2)
        streamed = list(client.generate_stream(PROMPT, "a", max_new_tokens=4, ignore_eos=True, prompt_logprobs=2))
        text = client.generate("a text prompt", "", max_new_tokens=1, prompt_logprobs=0)
        shared = prefill_rows_beyond_one()
        slow_decode(server, monkeypatch, seconds=0.05)  # newcomers queue up behind a step: one prefill
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            others = [pool.submit(client.generate, [9 + i] * (3 + 2 * i), "a" if i % 2 else "", max_new_tokens=6,
                                  ignore_eos=True, prompt_logprobs=(i if i % 3 else None)) for i in range(5)]
            together = pool.submit(client.generate, PROMPT, "a", max_new_tokens=4, ignore_eos=True,
                                   prompt_logprobs=2)
            assert [len(f.result().prompt_logprobs) for f in others] == [0, 4, 6, 0, 10]
            together = together.result()
    assert prefill_rows_beyond_one() > shared  # some prompts were prefilled together
    assert list(together.token_ids) == list(alone.token_ids)
    for a, b in zip(together.prompt_logprobs, alone.prompt_logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert list(a.top_token_ids) == list(b.top_token_ids)
        assert list(a.top_logprobs) == pytest.approx(list(b.top_logprobs), abs=1e-5)
    assert list(streamed[0].prompt_token_ids) == PROMPT
    assert list(streamed[0].prompt_logprobs) == list(alone.prompt_logprobs)
    assert all(not m.prompt_token_ids and not m.prompt_logprobs for m in streamed[1:])
    # a text prompt's tokens are returned as tokenized, each scored but the first
    tokenized = AutoTokenizer.from_pretrained(model_dirs["llama"])("a text prompt").input_ids
    assert list(text.prompt_token_ids) == tokenized and len(text.prompt_logprobs) == len(tokenized) - 1
    assert all(e.logprob <= 0 and not e.top_token_ids for e in text.prompt_logprobs)


def test_too_many_prompt_alternatives_are_refused(server):
    with Client(server.target, timeout=60) as client:
        code, message = status_of(client.generate, PROMPT, max_new_tokens=2, prompt_logprobs=21)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs must be at most 20" in message


def test_prompt_logprobs_of_a_prompt_chunked_across_iterations_while_scored_groups_join(model_dirs, adapter_root,
                                                                                        monkeypatch):
    """A long scored prompt runs 16 tokens an iteration (--max-prefill-tokens 16) while short scored groups are
    prefilled whole meanwhile, on the base model and the adapter (review)."""
    models = {"": AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()}
    models["a"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
                                            adapter_root / "a").eval()
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=8, max_prefill_tokens=16)
    try:
        slow_decode(server, monkeypatch, seconds=0.02)
        jobs = [([(11 * i) % 240 + 5 for i in range(70)], "a", 3), ([42], "a", 2)] + \
            [([(3 * i + k) % 200 + 7 for i in range(2 + k)], "a" if k % 2 else "", k % 4) for k in range(6)]
        with Client(server.target, timeout=120) as client, concurrent.futures.ThreadPoolExecutor(9) as pool:
            running = pool.submit(client.generate, [5, 6, 7], "", max_new_tokens=60, ignore_eos=True)
            assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] >= 1, timeout=10)
            replies = [pool.submit(client.generate, p, a, max_new_tokens=2, ignore_eos=True, prompt_logprobs=k)
                       for p, a, k in jobs]
            replies = [f.result() for f in replies]
            running.result()
        assert scrape(server)['loraplex_step_duration_seconds_count{phase="prefill"}'] >= 70 / 16
    finally:
        server.stop()
    for (prompt, adapter_id, k), reply in zip(jobs, replies):
        assert list(reply.prompt_token_ids) == prompt
        assert_logprobs_close(reply.prompt_logprobs, _prompt_reference(models[adapter_id], prompt, k), 1e-4)

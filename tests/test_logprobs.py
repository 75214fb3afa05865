"""GenerateRequest.logprobs: each generated token's log-probability and its step's most likely tokens', under the
model's own distribution with the request's adapter, equal to what HF/PEFT compute for the same tokens, whatever
else shares the batch, streamed as returned whole."""
import concurrent.futures

import grpc
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clients.client import Client
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, slow_decode, start_server, status_of

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "a", 3, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    return root


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
    for got, (logprob, ids, values) in zip(reply.logprobs, expected):
        assert got.logprob == pytest.approx(logprob, abs=tolerance)
        assert list(got.top_logprobs) == pytest.approx(values, abs=tolerance)
        # the same ids in the same order, but where two alternatives are within the tolerance of each other
        apart = [i for i in range(len(values))
                 if all(abs(values[i] - v) > tolerance for v in values[max(0, i - 1):i] + values[i + 1:i + 2])]
        assert [got.top_token_ids[i] for i in apart] == [ids[i] for i in apart]


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

"""GenerateRequest.prompt_logprobs: every prompt token after the first gets its log-probability given the tokens
before it, and its position's most likely tokens', under the model with the request's adapter. Each equals what the
last position of a prefill of the prompt cut before that token gives (alone), whatever shares the prefill and however
it is chunked; over gRPC they equal HF's and PEFT's, streamed as returned whole."""
import concurrent.futures

import grpc
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import server.batch
from adapters.canonical import AdapterKind, CanonicalAdapter, ModuleFactors
from adapters.slot_bank import SlotBank
from clients.client import Client
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from loader.inject import inject
from server.batch import Row, Runner
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, scrape, slow_decode, start_server, status_of

SMALL = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
MODELS = {
    "llama": ("llama", SMALL),
    "gemma3-types": ("gemma3_text", dict(SMALL, head_dim=12, sliding_window=5,
                                         layer_types=["sliding_attention", "full_attention"])),
    # soft-caps its logits after the head: the positions handed to the head must still be capped
    "gemma2-softcap": ("gemma2", dict(SMALL, head_dim=12, sliding_window=6, final_logit_softcapping=3.0)),
}
PROMPTS = [[(7 * i) % 250 + 5 for i in range(23)], [40, 41, 42, 43, 44, 45, 46], [9],
           [(5 * i) % 200 + 9 for i in range(16)]]
PROMPT = [5, 17, 42, 99, 7, 23, 64, 8]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    found = {}
    for name, (arch, cfg) in MODELS.items():
        base = load_base_model(str(build_model_dir(root / name, arch, seed=3, **cfg)), "cpu", "float32")
        context, shapes = inject(base.model)
        bank = SlotBank(shapes, num_slots=2, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
        torch.manual_seed(0)
        adapter = CanonicalAdapter("a", AdapterKind.LORA, {s.name: ModuleFactors(a=torch.randn(4, s.d_in) * 0.3,
                                                                                 b=torch.randn(s.d_out, 4) * 0.3)
                                                           for s in shapes}, load_serial=1)
        found[name] = Runner(base.model, context, bank, base.pad_token_id, base.max_context), bank.acquire(adapter)
    return found


def _alone(runner, prompt, slot, top):
    """Each prompt token's (log-probability, top ids, top values) from the last position of a prefill of the
    prompt cut before it, alone: the path every generated token's logits take."""
    found = []
    for k in range(1, len(prompt)):
        logp = torch.log_softmax(runner.prefill([Row(prompt[:k], slot)])[1][0], -1)
        values, ids = logp.topk(top)
        found.append((logp[prompt[k]].item(), ids.tolist(), values.tolist()))
    return found


def _assert_close(got, expected, tolerance=1e-5):
    assert len(got) == len(expected)
    for entry, (logprob, ids, values) in zip(got, expected):
        assert entry.logprob == pytest.approx(logprob, abs=tolerance)
        assert list(entry.top_logprobs) == pytest.approx(values, abs=tolerance)
        # the same ids in the same order, where no two alternatives are within the tolerance of each other
        apart = [i for i in range(len(values))
                 if all(abs(values[i] - v) > tolerance for v in values[max(0, i - 1):i] + values[i + 1:i + 2])]
        assert [entry.top_token_ids[i] for i in apart] == [ids[i] for i in apart]


@pytest.mark.parametrize("headless", [False, True], ids=["head-hook", "no-head-module"])
@pytest.mark.parametrize("name", list(MODELS))
def test_scored_prompts_in_a_chunked_mixed_prefill_equal_each_prefix_alone(runners, name, headless, monkeypatch):
    runner, slot = runners[name]
    if headless:  # a model without an output-embeddings module: every position's logits are made, then picked
        monkeypatch.setattr(runner, "_head", None)
    slots = [slot, 0, slot, 0]
    plain = runner.prefill([Row(p, s) for p, s in zip(PROMPTS, slots)])[1]
    monkeypatch.setattr(server.batch, "SCORED_ELEMENTS", 3 * runner.vocab_size)  # 1 column a forward for 3 rows
    seen = []
    forward = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda ids, *a: seen.append(ids.shape[1]) or forward(ids, *a))
    # rows 0, 2 (adapter) and 3 (base) scored with different alternatives; row 2's one token has none to score
    job = runner.start_prefill([Row(p, s) for p, s in zip(PROMPTS, slots)], {0: 3, 2: 1, 3: 0})
    logits = None
    while logits is None:  # in iterations of 5 columns, as the engine runs a long prompt
        logits = runner.advance(job, 5)
    assert max(seen) == 1 and len(seen) == len(PROMPTS[0])
    assert torch.allclose(logits, plain, atol=1e-5)  # the rows' next-token logits are those of a plain prefill
    assert set(job.scores) == {0, 2, 3} and job.scores[2] == []
    _assert_close(job.scores[0], _alone(runner, PROMPTS[0], slot, 3))
    _assert_close(job.scores[3], _alone(runner, PROMPTS[3], 0, 0))
    assert all(not e.top_token_ids for e in job.scores[3])


def test_a_prefill_scoring_no_row_runs_as_before(runners, monkeypatch):
    runner, slot = runners["llama"]
    kept = []
    forward = runner.model.forward
    monkeypatch.setattr(runner.model, "forward", lambda **kw: kept.append(kw["logits_to_keep"]) or forward(**kw))
    job = runner.start_prefill([Row(p, slot) for p in PROMPTS])
    runner.advance(job, job.length)
    assert kept == [1] and job.scores == {}


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "a", 3, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    return root


@pytest.fixture(scope="module")
def grpc_server(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=8)
    yield server
    server.stop()


def _hf(model, prompt, top):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    values, ids = logp.topk(top, dim=-1)
    return [(logp[i, t].item(), ids[i].tolist(), values[i].tolist()) for i, t in enumerate(prompt[1:])]


@pytest.mark.parametrize("adapter_id", ["", "a"])
def test_prompt_logprobs_equal_hf_and_peft(grpc_server, model_dirs, adapter_root, adapter_id):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    if adapter_id:
        model = PeftModel.from_pretrained(model, adapter_root / adapter_id).eval()
    with Client(grpc_server.target, timeout=60) as client:
        reply = client.generate(PROMPT, adapter_id, max_new_tokens=3, ignore_eos=True, prompt_logprobs=4,
                                logprobs=2)
        plain = client.generate(PROMPT, adapter_id, max_new_tokens=3, ignore_eos=True)
    assert list(reply.prompt_token_ids) == PROMPT
    _assert_close(reply.prompt_logprobs, _hf(model, PROMPT, 4), tolerance=1e-4)
    assert list(reply.token_ids) == list(plain.token_ids) and len(reply.logprobs) == 3
    assert not plain.prompt_token_ids and not plain.prompt_logprobs


def test_prompt_logprobs_in_a_mixed_batch_equal_alone_and_streamed_equal_unary(grpc_server, model_dirs, monkeypatch):
    def prefill_rows_beyond_one():
        found = scrape(grpc_server)
        return (found['loraplex_batch_size_sum{phase="prefill"}']
                - found['loraplex_batch_size_count{phase="prefill"}'])
    with Client(grpc_server.target, timeout=60) as client:
        alone = client.generate(PROMPT, "a", max_new_tokens=4, ignore_eos=True, prompt_logprobs=2)
        streamed = list(client.generate_stream(PROMPT, "a", max_new_tokens=4, ignore_eos=True, prompt_logprobs=2))
        text = client.generate("a text prompt", "", max_new_tokens=1, prompt_logprobs=0)
        shared = prefill_rows_beyond_one()
        slow_decode(grpc_server, monkeypatch, seconds=0.05)  # newcomers queue up behind a step: one prefill
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


def test_too_many_prompt_alternatives_are_refused(grpc_server):
    with Client(grpc_server.target, timeout=60) as client:
        code, message = status_of(client.generate, PROMPT, max_new_tokens=2, prompt_logprobs=21)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs must be at most 20" in message

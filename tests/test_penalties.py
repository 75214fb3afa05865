"""Repetition, presence and frequency penalties, min_p, min_new_tokens and stop_token_ids, through the real server:
HF generate's tokens where HF has the setting (repetition penalty, min_new_tokens), a step-by-step reference where it
has not (OpenAI's presence and frequency penalties), and a row's tokens the same alone and in a mixed batch."""
import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clients.client import AsyncClient, Client
from loader.default_model import build_model_dir, build_tokenizer
from protos.loraplex.v1 import inference_pb2 as pb
from server.penalties import TokenHistory, penalize
from server.sampling import SamplingParams, make_generator, sample
from server.stopping import FinishReason, StoppingParams, TextStream
from tests.helpers import LLAMA_TARGETS, make_peft_adapter, start_server

PROMPTS = [[5, 17, 99, 3, 42, 8, 120, 5, 17], [200, 11], [64, 65, 66, 67, 68, 69]]
NEW = 16


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "lora", 3, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    server = start_server(model_dirs["llama"], root)
    yield model_dirs["llama"], root, server
    server.stop()


def _together(target: str, requests: list) -> list:
    """Responses to (prompt, adapter id, kwargs) requests sent at once: they share batches."""
    async def run():
        async with AsyncClient(target, timeout=60) as client:
            return await asyncio.gather(*[client.generate(p, a, **kw) for p, a, kw in requests])
    return asyncio.run(run())


def _alone(target: str, prompt, adapter_id: str = "", **kwargs):
    with Client(target, timeout=60) as client:
        return client.generate(prompt, adapter_id, **kwargs)


def _hf_greedy(model, prompt: list[int], **kwargs) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_gives_hf_generates_tokens_alone_and_in_a_mixed_batch(served):
    model_dir, root, server = served
    models = {"": AutoModelForCausalLM.from_pretrained(model_dir).eval()}
    models["lora"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / "lora").eval()
    penalty = dict(max_new_tokens=NEW, ignore_eos=True, repetition_penalty=1.8)
    requests, expected, plain = [], [], []
    for adapter_id, model in models.items():
        for prompt in PROMPTS:
            requests.append((prompt, adapter_id, penalty))
            expected.append(_hf_greedy(model, prompt, max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.8))
            plain.append(_hf_greedy(model, prompt, max_new_tokens=NEW, eos_token_id=None))
    # unpenalized rows of the same prompts share the batches
    together = _together(server.target, requests + [(p, a, dict(max_new_tokens=NEW, ignore_eos=True))
                                                    for p, a, _ in requests])
    assert [list(r.token_ids) for r in together] == expected + plain
    assert [list(_alone(server.target, p, a, **kw).token_ids) for p, a, kw in requests] == expected
    assert sum(e != p for e, p in zip(expected, plain)) >= 3, "the penalty changed too little to prove anything"
    # the bounds themselves are served (0.01 arrives as float32 0.0099999998)
    for bound in (0.01, 100.0):
        assert len(_alone(server.target, PROMPTS[1], max_new_tokens=2, repetition_penalty=bound).token_ids) >= 1
    # a penalty below 1 favours repeats: HF's too
    favour = _hf_greedy(models[""], PROMPTS[1], max_new_tokens=NEW, eos_token_id=None, repetition_penalty=0.5)
    got = _alone(server.target, PROMPTS[1], max_new_tokens=NEW, ignore_eos=True, repetition_penalty=0.5)
    assert list(got.token_ids) == favour


def _openai_reference(model, prompt: list[int], presence: float, frequency: float, new: int) -> list[int]:
    """Greedy decoding with OpenAI's penalties, one full forward per token: logit - presence x [n > 0] - frequency x
    n, n the token's count in the output so far."""
    ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
    for _ in range(new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int((logits - presence * (counts > 0) - frequency * counts).argmax())
        counts[token] += 1
        ids.append(token)
    return ids[len(prompt):]


def test_presence_and_frequency_penalties_give_the_references_tokens_alone_and_in_a_mixed_batch(served):
    model_dir, root, server = served
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / "lora").eval()
    cases = [dict(presence_penalty=1.5), dict(frequency_penalty=0.8), dict(presence_penalty=0.5, frequency_penalty=1.0),
             dict(presence_penalty=-2.0)]
    requests = [(p, "lora", dict(max_new_tokens=NEW, ignore_eos=True, **c)) for c in cases for p in PROMPTS]
    expected = [_openai_reference(model, p, c.get("presence_penalty", 0.0), c.get("frequency_penalty", 0.0), NEW)
                for c in cases for p in PROMPTS]
    plain = [_hf_greedy(model, p, max_new_tokens=NEW, eos_token_id=None) for p in PROMPTS]
    together = _together(server.target, requests + [(p, "", dict(max_new_tokens=NEW, ignore_eos=True))
                                                    for p in PROMPTS])
    assert [list(r.token_ids) for r in together[:len(requests)]] == expected
    assert [list(_alone(server.target, p, a, **kw).token_ids) for p, a, kw in requests[:3]] == expected[:3]
    assert sum(e != p for e, p in zip(expected, plain * len(cases))) >= 6
    # a negative presence penalty favours what the output holds: fewer distinct tokens than greedy
    assert sum(len(set(e)) for e in expected[-3:]) < sum(len(set(p)) for p in plain)


@pytest.fixture(scope="module")
def ending_model(model_dirs, tmp_path_factory):
    """The llama test model (same weights) with an end-of-sequence id its greedy output reaches at the 4th token."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    free = _hf_greedy(model, PROMPTS[0], max_new_tokens=NEW, eos_token_id=None)
    eos = free[3]
    assert eos not in free[:3]
    out = build_model_dir(tmp_path_factory.mktemp("eos") / "m", "llama", seed=1, eos_token_id=eos)
    return out, eos, free


def test_min_new_tokens_gives_hf_generates_tokens_and_bans_the_end_until_then(ending_model):
    model_dir, eos, free = ending_model
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ends = [eos, 2]  # the config's and the tokenizer's
    server = start_server(model_dir, None)
    try:
        stopped = _alone(server.target, PROMPTS[0], max_new_tokens=NEW)
        assert list(stopped.token_ids) == free[:4] and stopped.finish_reason == pb.FINISH_REASON_EOS_TOKEN
        assert stopped.text == build_tokenizer().decode(free[:3])  # an ordinary token as the end: its text not shown
        for minimum in (3, 4, 9):
            expected = _hf_greedy(model, PROMPTS[0], max_new_tokens=NEW, eos_token_id=ends, min_new_tokens=minimum)
            got = _together(server.target, [(PROMPTS[0], "", dict(max_new_tokens=NEW, min_new_tokens=minimum)),
                                            (PROMPTS[1], "", dict(max_new_tokens=NEW, ignore_eos=True))])[0]
            assert list(got.token_ids) == expected, minimum
            assert not set(expected[:minimum]) & set(ends) and len(expected) > minimum
        # stop_token_ids: generating one stops as a stop sequence, its id last, the text before it
        tokenizer = build_tokenizer()
        plain = free[:NEW]
        stop_id = plain[5]
        first = plain.index(stop_id)
        unused = next(t for t in range(3, 259) if t not in plain)
        got = _alone(server.target, PROMPTS[0], max_new_tokens=NEW, ignore_eos=True, stop_token_ids=[unused, stop_id])
        assert list(got.token_ids) == plain[:first + 1] and got.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
        assert got.text == tokenizer.decode(plain[:first])
        # ... and a minimum bans it too, as HF bans the end ids
        banned = _hf_greedy(model, PROMPTS[0], max_new_tokens=NEW, eos_token_id=[stop_id], min_new_tokens=first + 2)
        got = _alone(server.target, PROMPTS[0], max_new_tokens=NEW, ignore_eos=True, stop_token_ids=[stop_id],
                     min_new_tokens=first + 2)
        assert list(got.token_ids) == banned and stop_id not in banned[:first + 2]
    finally:
        server.stop()


def _stream(**stopping) -> TextStream:
    return TextStream(build_tokenizer(), StoppingParams(**{"max_new_tokens": 50, **stopping}), frozenset({2}))


def test_a_stop_sequence_counts_only_when_a_token_after_the_minimum_completes_it():
    tokenizer = build_tokenizer()
    ids = tokenizer("xab-ab-yab!").input_ids  # one token per byte
    free = _stream(stop=("ab",))
    [free.push(t) for t in ids[:3]]
    assert free.finish is FinishReason.STOP_SEQUENCE and free.text == "x"
    held = _stream(stop=("ab",), min_new_tokens=3)  # "ab" completed by the 3rd token: passed over
    texts = [held.push(t) for t in ids[:6]]
    assert held.finish is FinishReason.STOP_SEQUENCE and "".join(texts) == held.text == "xab-"
    straddling = _stream(stop=("ab",), min_new_tokens=5)  # the 6th token completes the "ab" the 5th starts
    [straddling.push(t) for t in ids[:6]]
    assert straddling.finish is FinishReason.STOP_SEQUENCE and straddling.text == "xab-"
    eos = _stream(min_new_tokens=2)  # an end-of-sequence id before the minimum does not end the row
    eos.push(ids[0]), eos.push(2)
    assert eos.finish is None
    eos.push(2)
    assert eos.finish is FinishReason.EOS_TOKEN


def test_min_p_draws_only_tokens_at_least_that_fraction_as_likely_as_the_likeliest():
    """20000 seeded rows in one batch: each kept token drawn with its renormalized probability (within 0.015), the
    others never; applied after top-k and top-p, as HF's MinPLogitsWarper."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    probs = logits.softmax(-1)  # 0.405 0.245 0.149 0.090 0.055 ...
    for params, keep in [(SamplingParams(temperature=1.0, min_p=0.3), probs >= 0.3 * probs[0]),  # 3 tokens
                         (SamplingParams(temperature=1.0, min_p=0.2), probs >= 0.2 * probs[0]),  # 4 tokens
                         (SamplingParams(temperature=1.0, top_k=2, min_p=0.2), logits >= 1.5),
                         (SamplingParams(temperature=1.0, min_p=1.0), logits >= 2.0)]:
        rows = [SamplingParams(params.temperature, params.top_k, params.top_p, i, params.min_p) for i in range(20000)]
        drawn = sample(logits.expand(len(rows), -1), rows, [make_generator(q) for q in rows])
        got = torch.bincount(torch.tensor(drawn), minlength=len(logits)) / len(rows)
        want = probs * keep / (probs * keep).sum()
        assert (got - want).abs().max() < 0.015, (params, got, want)
        assert got[~keep].sum() == 0, params


def test_the_command_line_sends_the_new_settings(served, capsys):
    from clients.cli import main
    _, _, server = served
    expected = _alone(server.target, "tiger", max_new_tokens=8, ignore_eos=True, repetition_penalty=1.8,
                      presence_penalty=1.0, frequency_penalty=0.5, min_new_tokens=8, logit_bias={ord("a"): 3.5})
    unbiased = _alone(server.target, "tiger", max_new_tokens=8, ignore_eos=True, repetition_penalty=1.8,
                      presence_penalty=1.0, frequency_penalty=0.5, min_new_tokens=8)
    assert expected.text != unbiased.text != _alone(server.target, "tiger", max_new_tokens=8, ignore_eos=True).text
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--target", server.target, "tiger", "--max-new-tokens", "8", "--ignore-eos",
              "--repetition-penalty", "1.8", "--presence-penalty", "1.0", "--frequency-penalty", "0.5",
              "--min-new-tokens", "8", "--min-p", "0.1", "--stop-token-id", "258", "--logit-bias", f"{ord('a')}=3.5"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == expected.text + "\n"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--target", server.target, "tiger", "--logit-bias", "a=1"])
    assert exited.value.code == 2 and "'a=1' is not TOKEN_ID=BIAS" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # (review) the second silently replaced the first
        main(["generate", "--target", server.target, "tiger", "--logit-bias", "5=1", "--logit-bias", "5=-2"])
    assert exited.value.code == 2 and "token id 5 is given more than once" in capsys.readouterr().err


def test_log_probabilities_stay_the_models_own_under_penalties(served):
    """A step's log-probabilities are of the model's logits, not of the penalized ones (a penalized row whose
    log-probabilities are asked for keeps its own logits; the others are penalized in place)."""
    _, _, server = served
    plain, penalized = _together(server.target, [
        (PROMPTS[0], "lora", dict(max_new_tokens=3, ignore_eos=True, logprobs=5)),
        (PROMPTS[0], "lora", dict(max_new_tokens=3, ignore_eos=True, logprobs=5, repetition_penalty=50.0,
                                  min_new_tokens=2, stop_token_ids=[2]))])
    first, penalized_first = plain.logprobs[0], penalized.logprobs[0]
    assert list(penalized_first.top_token_ids) == list(first.top_token_ids)
    assert list(penalized_first.top_logprobs) == pytest.approx(list(first.top_logprobs), abs=1e-6)
    assert plain.token_ids[0] != penalized.token_ids[0]  # the penalty changed the choice, not the log-probabilities


def test_logit_bias_gives_hf_generates_tokens_alone_and_in_a_mixed_batch(served):
    """OpenAI's logit_bias, as HF's sequence_bias of one-token sequences: added to the logits before the choice."""
    model_dir, root, server = served
    models = {"": AutoModelForCausalLM.from_pretrained(model_dir).eval()}
    models["lora"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / "lora").eval()
    requests, expected, plain = [], [], []
    for adapter_id, model in models.items():
        for prompt in PROMPTS:
            first = _hf_greedy(model, prompt, max_new_tokens=2, eos_token_id=None, repetition_penalty=1.3)
            # the likeliest two tokens all but banned, a third favoured a little, on top of a repetition penalty
            bias = {first[0]: -100.0, first[1]: -100.0, (first[0] + 1) % 250: 0.5}
            requests.append((prompt, adapter_id, dict(max_new_tokens=NEW, ignore_eos=True, logit_bias=bias,
                                                      repetition_penalty=1.3)))
            expected.append(_hf_greedy(model, prompt, max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.3,
                                       sequence_bias=[[[t], b] for t, b in bias.items()]))
            plain.append(_hf_greedy(model, prompt, max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.3))
    together = _together(server.target, requests + [(p, a, dict(kw, logit_bias=None)) for p, a, kw in requests])
    assert [list(r.token_ids) for r in together] == expected + plain
    assert [list(_alone(server.target, p, a, **kw).token_ids) for p, a, kw in requests] == expected
    assert all(e[0] != p[0] for e, p in zip(expected, plain))
    # sampled: a +100 bias all but forces its token, whatever the temperature; log-probabilities are the model's
    forced = _alone(server.target, PROMPTS[0], "lora", max_new_tokens=6, ignore_eos=True, temperature=1.5, seed=3,
                    logit_bias={77: 100.0}, logprobs=1)
    assert list(forced.token_ids) == [77] * 6 and all(lp.logprob < -1.0 for lp in forced.logprobs)


def test_one_rows_penalties_and_bans_never_reach_another_row():
    """All rows' ids share one flat index over [B x V]: a config's eos_token_id -1 banned the row before's last
    logit (review); a non-contiguous batch of logits is taken too."""
    ban = TokenHistory.of([3, 4], SamplingParams(), StoppingParams(8, min_new_tokens=2), frozenset({-1, 2}))
    rep = TokenHistory.of([0, 4], SamplingParams(repetition_penalty=2.0), StoppingParams(8), frozenset())
    bias = TokenHistory.of([1], SamplingParams(logit_bias=((0, 3.0), (4, -1.0))), StoppingParams(8), frozenset())
    logits = torch.ones(5, 4).t()  # [4, 5], not contiguous
    out = penalize(logits, [None, ban, rep, bias])
    assert out[0].tolist() == [1.0] * 5
    assert out[1].tolist() == [1.0, 1.0, float("-inf"), 1.0, 1.0]
    assert out[2].tolist() == [0.5, 1.0, 1.0, 1.0, 0.5]
    assert out[3].tolist() == [4.0, 1.0, 1.0, 1.0, 0.0]

"""GenerateRequest.prompt_logprobs in the batch runner: every prompt token after the first gets its log-probability
given the tokens before it, and its position's most likely tokens', under the model with the row's adapter. Each
equals what the last position of a prefill of the prompt cut before that token gives (alone), whatever shares the
prefill and however it is chunked. (Through the server, against HF and PEFT: tests/test_logprobs.py.)"""
import pytest
import torch

import server.batch
import server.prompt_scores
from loader.default_model import build_model_dir
from server.batch import Row
from tests.helpers import assert_logprobs_close, random_lora_runner

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


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    return {name: random_lora_runner(build_model_dir(root / name, arch, seed=3, **cfg))
            for name, (arch, cfg) in MODELS.items()}


def _alone(runner, prompt, slot, top):
    """Each prompt token's (log-probability, top ids, top values) from the last position of a prefill of the
    prompt cut before it, alone: the path every generated token's logits take."""
    found = []
    for k in range(1, len(prompt)):
        logp = torch.log_softmax(runner.prefill([Row(prompt[:k], slot)])[1][0], -1)
        values, ids = logp.topk(top)
        found.append((logp[prompt[k]].item(), ids.tolist(), values.tolist()))
    return found


# Gemma-2's logits are soft-capped after its head: never projected apart from the forward
@pytest.mark.parametrize("name,path", [(name, path) for name in MODELS for path in ("apart", "in-forward",
                                                                                     "no-head-module")
                                       if (name, path) != ("gemma2-softcap", "apart")])
def test_scored_prompts_in_a_chunked_mixed_prefill_equal_each_prefix_alone(runners, name, path, monkeypatch):
    runner, slot = runners[name]
    assert runner.tap.gives_logits() == (name != "gemma2-softcap")
    if path == "in-forward":
        monkeypatch.setattr(runner.tap, "_gives_logits", False)
    if path == "no-head-module":  # every position's logits are made, then picked
        monkeypatch.setattr(runner.tap, "head", None)
        monkeypatch.setattr(runner.tap, "_gives_logits", False)
    slots = [slot, 0, slot, 0]
    plain = runner.prefill([Row(p, s) for p, s in zip(PROMPTS, slots)])[1]
    # inside the forward: 1 column a forward for 3 scored rows; apart: blocks of 3 positions
    monkeypatch.setattr(server.batch, "SCORED_ELEMENTS", 3 * runner.vocab_size)
    monkeypatch.setattr(server.prompt_scores, "SCORED_ELEMENTS", 3 * runner.vocab_size)
    seen, blocks = [], []
    forward, project = runner._forward, runner.tap.project
    monkeypatch.setattr(runner, "_forward", lambda ids, *a, **k: seen.append(ids.shape[1]) or forward(ids, *a, **k))
    monkeypatch.setattr(runner.tap, "project", lambda *a: (blocks.append(len(x)) or x for x in project(*a)))
    # rows 0, 2 (adapter) and 3 (base) scored with different alternatives; row 2's one token has none to score
    job = runner.start_prefill([Row(p, s) for p, s in zip(PROMPTS, slots)], {0: 3, 2: 1, 3: 0})
    logits = None
    while logits is None:  # in iterations of 5 columns, as the engine runs a long prompt
        logits = runner.advance(job, 5)
    if path == "apart":  # the chunks are those of an unscored prefill
        assert seen == [5, 5, 5, 5, 3] and max(blocks) == 3 and sum(blocks) == 22 + 15
    else:
        assert max(seen) == 1 and len(seen) == len(PROMPTS[0]) and not blocks
    assert torch.allclose(logits, plain, atol=1e-5)  # the rows' next-token logits are those of a plain prefill
    assert set(job.scores) == {0, 2, 3} and len(job.scores[2]) == 0 and not job.broken
    assert_logprobs_close(list(job.scores[0].entries()), _alone(runner, PROMPTS[0], slot, 3), 1e-5)
    assert_logprobs_close(list(job.scores[3].entries()), _alone(runner, PROMPTS[3], 0, 0), 1e-5)
    assert all(not e.top_token_ids for e in job.scores[3].entries())


def test_a_prefill_scoring_no_row_runs_as_before(runners, monkeypatch):
    runner, slot = runners["llama"]
    kept = []
    forward = runner.model.forward
    monkeypatch.setattr(runner.model, "forward", lambda **kw: kept.append(kw["logits_to_keep"]) or forward(**kw))
    job = runner.start_prefill([Row(p, slot) for p in PROMPTS])
    runner.advance(job, job.length)
    assert kept == [1] and job.scores == {}


def test_a_row_whose_logits_at_a_prompt_position_are_not_finite_is_broken_alone(runners, monkeypatch):
    """(review) It fails, as a row whose next-token logits are not finite does, instead of returning NaN scores."""
    runner, slot = runners["llama"]
    project = runner.tap.project

    def poisoned(hidden, vocab):
        for i, logits in enumerate(project(hidden, vocab)):
            if i == 0 and len(hidden) < 30:  # a middle chunk's: the scored positions only
                logits[0, 5] = float("nan")  # row 0's first scored position there
            yield logits
    monkeypatch.setattr(runner.tap, "project", poisoned)
    job = runner.start_prefill([Row(PROMPTS[0], slot), Row(PROMPTS[3], 0)], {0: 1, 1: 1})
    while runner.advance(job, 10) is None:
        pass
    assert job.broken == {0} and len(job.scores[1]) == len(PROMPTS[3]) - 1


def test_a_model_whose_probe_forward_fails_projects_scores_inside_its_forwards(model_dirs, monkeypatch, caplog):
    """(review) The check of whether the logits are the head's output failed the whole prefill it ran in."""
    from transformers import AutoModelForCausalLM

    from server.prompt_scores import HeadTap
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    assert HeadTap(model).gives_logits() is True
    tap = HeadTap(model)
    monkeypatch.setattr(model, "forward", lambda **kw: 1 / 0)
    assert tap.gives_logits() is False and "prompt scores will be projected inside" in caplog.text

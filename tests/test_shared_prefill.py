"""Rows with the same prompt and adapter in one prefill (n samples of one prompt, as RL rollouts and best-of-n send
them) run that prompt once, and each gets a copy of its cache: every row's logits, and its tokens after, are those it
gets alone; a row scoring its prompt (prompt_logprobs) runs it whole, shared with its call's other completions only."""
import concurrent.futures
import threading
from types import SimpleNamespace

import pytest
import torch

from clients.client import Client
from loader.default_model import build_model_dir
from server.batch import Row
from tests.helpers import (assert_logprobs_close, decode_forced, decode_from, lora_root, random_lora_runner, scrape,
                           slow_decode, start_server, wait_for)

SMALL = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
MODELS = {"llama": ("llama", SMALL),
          "gemma3-types": ("gemma3_text", dict(SMALL, head_dim=12, sliding_window=5,
                                               layer_types=["sliding_attention", "full_attention"]))}
A, B = [(7 * i) % 250 + 5 for i in range(19)], [40, 41, 42, 43, 44, 45, 46]


@pytest.fixture(scope="module", params=list(MODELS))
def runner_and_slot(request, tmp_path_factory):
    arch, cfg = MODELS[request.param]
    return random_lora_runner(build_model_dir(tmp_path_factory.mktemp("shared") / "m", arch, seed=3, **cfg))


def test_rows_sharing_a_prompt_and_adapter_run_it_once_and_decode_as_alone(runner_and_slot, monkeypatch):
    runner, slot = runner_and_slot
    rows = [(A, slot), (A, slot), (A, 0), (B, slot), (A, slot), (B, 0), (B, 0)]
    forced = torch.tensor([[(11 * r + 3 * s) % 250 + 2 for s in range(4)] for r in range(len(rows))])
    alone = [decode_forced(runner, [Row(p, s)], forced=forced[i:i + 1], steps=4)[0][0] for i, (p, s) in
             enumerate(rows)]
    widths = []
    forward = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda ids, *a: widths.append(ids.shape[0]) or forward(ids, *a))
    together, _ = decode_forced(runner, [Row(p, s) for p, s in rows], forced=forced, steps=4)
    assert widths == [4] + [len(rows)] * 4  # A+adapter, A+base, B+adapter, B+base prefilled; every row decoded
    for i in range(len(rows)):
        torch.testing.assert_close(together[i], alone[i], atol=1e-5, rtol=0)


def test_a_running_rows_cached_prompt_given_to_newcomers_decodes_as_alone(runner_and_slot):
    runner, slot = runner_and_slot
    forced = torch.tensor([[(13 * s) % 250 + 2 for s in range(3)]] * 2)
    alone, _ = decode_forced(runner, [Row(A, slot)], forced=forced[:1], steps=3)
    longer = [(3 * i) % 200 + 9 for i in range(25)]
    running, _ = runner.prefill([Row(longer, 0), Row(A, slot)])  # A right-aligned after 6 pads, then decodes
    for token in (7, 8):
        for row in running.rows:
            row.last_token = token
        runner.decode_step(running)
    job = runner.start_prefill([Row(A, slot), Row(A, slot)], prefixes={0: runner.held_prompt(running, 1)})
    assert job.done == len(A) - 1 and job.width == 1
    logits = runner.advance(job, job.length)
    together, _ = decode_from(runner, runner.prefilled(job), logits, forced, steps=3)
    for i in range(2):
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)


def test_a_row_scoring_its_prompt_runs_it_whole_for_the_rows_sharing_it(runner_and_slot):
    runner, slot = runner_and_slot
    alone = runner.start_prefill([Row(A, slot)], {0: 2})
    alone_logits = runner.advance(alone, alone.length)
    # the engine shares a scored prompt among its call's completions only (their key); a row whose prefix is
    # cached runs it whole beside a scored row of its group
    prefix = runner.held_prompt(runner.prefill([Row(A, slot)])[0], 0)
    job = runner.start_prefill([Row(A, slot), Row(A, slot), Row(A, slot)], {1: 2}, prefixes={0: prefix})
    assert job.width == 1 and job.source == [0, 0, 0] and job.done == 0
    logits = runner.advance(job, job.length)
    assert len(job.scores[1]) == len(A) - 1 and logits.shape[0] == 3
    assert job.scores[1].top_ids == alone.scores[0].top_ids
    for got, expected in ((job.scores[1].logprobs, alone.scores[0].logprobs),
                          (job.scores[1].top_logprobs, alone.scores[0].top_logprobs)):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-5, rtol=0)
    batch = runner.prefilled(job)
    assert len(batch) == 3 and batch.cache.tensors()[0][0].shape[0] == 3
    assert runner.start_prefill([Row(A, slot), Row(B, slot)]).source is None  # nothing shared: nothing to copy
    # the engine's key (adapter version, cache salt, prompt) decides: requests of different salts share nothing
    assert runner.start_prefill([Row(A, slot, share=(1, "x")), Row(A, slot, share=(1, "y"))]).source is None
    assert runner.start_prefill([Row(A, slot, share=(1, "x")), Row(A, slot, share=(1, "x"))]).source == [0, 0]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    server = start_server(model_dirs["llama"], lora_root(model_dirs, tmp_path_factory), max_batch_size=16)
    yield server
    server.stop()


def test_n_samples_of_one_prompt_sent_at_once_share_its_prefill_and_sample_as_alone(server, monkeypatch):
    prompt = [(5 * i) % 200 + 9 for i in range(40)]
    kwargs = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0)
    with Client(server.target, timeout=60) as client:
        alone = [list(client.generate(prompt, "a", seed=s, **kwargs).token_ids) for s in range(8)]
        greedy = list(client.generate(prompt, "a", max_new_tokens=8, ignore_eos=True).token_ids)
        runner = server.serving.engine.runner
        widths = []
        forward = runner._forward
        monkeypatch.setattr(runner, "_forward", lambda ids, *a: widths.append(ids.shape) or forward(ids, *a))
        slow_decode(server, monkeypatch, seconds=0.05)  # they queue behind a running step, and are admitted together
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            running = pool.submit(client.generate, [9, 10, 11], "", max_new_tokens=30, ignore_eos=True)
            assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] >= 1, timeout=10)
            samples = [pool.submit(client.generate, prompt, "a", seed=s, **kwargs) for s in range(8)]
            greedy_too = pool.submit(client.generate, prompt, "a", max_new_tokens=8, ignore_eos=True)
            assert [list(f.result().token_ids) for f in samples] == alone
            assert list(greedy_too.result().token_ids) == greedy
            running.result()
    assert len(set(map(tuple, alone))) > 1  # the seeds drew different samples
    prefills = [rows for rows, columns in widths if columns == len(prompt)]
    assert prefills and sum(prefills) < 9  # the nine requests' prompt ran fewer than nine times



def test_copies_of_a_prompt_beyond_the_prefill_budget_share_it(model_dirs, server, monkeypatch):
    """(review) A copy of an admitted prompt adds nothing to prefill: 6 samples of a prompt longer than
    --max-prefill-tokens ran it 6 times, one after another, in chunks; now once, in chunks, while a group of
    another prompt's copies joins whole."""
    long, short = [(7 * i) % 250 + 5 for i in range(100)], [(3 * i) % 200 + 9 for i in range(40)]
    kwargs = dict(max_new_tokens=4, ignore_eos=True, temperature=1.0)
    with Client(server.target, timeout=60) as client:
        alone = [list(client.generate(long, "a", seed=s, **kwargs).token_ids) for s in range(6)] + \
            [list(client.generate(short, "", seed=s, **kwargs).token_ids) for s in range(4)]
    root = server.serving.config.adapter_root
    budget = start_server(model_dirs["llama"], root, max_batch_size=16, max_prefill_tokens=64)
    try:
        runner, engine = budget.serving.engine.runner, budget.serving.engine
        shapes = []
        forward = runner._forward
        monkeypatch.setattr(runner, "_forward", lambda ids, *a, **k: shapes.append(ids.shape) or forward(ids, *a, **k))
        gate = threading.Event()
        with Client(budget.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(10) as pool:
            client.generate([5], "a", max_new_tokens=1)  # the adapter read before: its requests queue at once
            shapes.clear()
            held = engine.call(gate.wait)  # the engine waits between two steps while all ten are queued
            replies = [pool.submit(client.generate, long, "a", seed=s, **kwargs) for s in range(6)] + \
                [pool.submit(client.generate, short, "", seed=s, **kwargs) for s in range(4)]
            assert wait_for(lambda: scrape(budget)["loraplex_num_requests_waiting"] == 10, timeout=20)
            gate.set()
            held.result()
            assert [list(f.result().token_ids) for f in replies] == alone
    finally:
        gate.set()
        budget.stop()
    prefills = [(rows, columns) for rows, columns in shapes if columns > 1]
    assert sorted(prefills) == [(1, 36), (1, 40), (1, 64)]  # the long prompt in 2 chunks, the short one whole


def test_a_prompt_a_running_row_holds_is_taken_from_its_cache(server, monkeypatch):
    """n samples of one prompt arriving apart (the first of a burst on an idle server is prefilled alone): a newcomer
    whose prompt and adapter a running row has copies that row's cached prompt and runs its last token only."""
    prompt = [(5 * i) % 200 + 9 for i in range(40)]
    kwargs = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0)
    with Client(server.target, timeout=60) as client:
        alone = [list(client.generate(prompt, "a", seed=s, **kwargs).token_ids) for s in range(3)]
        base = list(client.generate(prompt, "", seed=0, **kwargs).token_ids)
        scored = client.generate(prompt, "a", seed=0, prompt_logprobs=0, **kwargs)
        runner = server.serving.engine.runner
        shapes = []
        forward = runner._forward
        monkeypatch.setattr(runner, "_forward", lambda ids, *a, **k: shapes.append(ids.shape) or forward(ids, *a, **k))
        slow_decode(server, monkeypatch, seconds=0.05)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            first = pool.submit(client.generate, prompt, "a", max_new_tokens=40, ignore_eos=True)  # the donor
            assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] >= 1, timeout=10)
            later = [pool.submit(client.generate, prompt, "a", seed=s, **kwargs) for s in range(3)]
            assert [list(f.result().token_ids) for f in later] == alone
            # another adapter's row, and a row scoring its prompt, run the whole prompt
            other = pool.submit(client.generate, prompt, "", seed=0, **kwargs)
            again = pool.submit(client.generate, prompt, "a", seed=0, prompt_logprobs=0, **kwargs)
            assert list(other.result().token_ids) == base
            assert list(again.result().token_ids) == list(scored.token_ids)
            assert list(again.result().prompt_logprobs) == list(scored.prompt_logprobs)
            first.result()
    # the whole prompt ran for the donor, the other adapter's row and the scored row; the newcomers' for none
    assert sum(rows for rows, columns in shapes if columns == len(prompt)) == 3
    assert all(columns in (1, len(prompt)) for _, columns in shapes)


def test_copies_of_a_running_rows_prompt_take_no_prefill_budget(model_dirs, server, monkeypatch):
    """(review) They run one token each: a new prompt queued behind them joins the same iteration's prefill, and a
    copy of a prompt longer than --max-prefill-tokens is admitted while another prompt runs in chunks."""
    donor, other = [(5 * i) % 200 + 9 for i in range(40)], [(3 * i) % 200 + 7 for i in range(40)]
    long, longer = [(7 * i) % 250 + 5 for i in range(100)], [(11 * i) % 240 + 5 for i in range(90)]
    kwargs = dict(max_new_tokens=4, ignore_eos=True, temperature=1.0)
    work = [(donor, "a", s) for s in range(3)] + [(other, "", 0), (long, "a", 7)]
    with Client(server.target, timeout=60) as client:
        alone = [list(client.generate(p, a, seed=s, **kwargs).token_ids) for p, a, s in work]
    budget = start_server(model_dirs["llama"], server.serving.config.adapter_root, max_batch_size=16,
                          max_prefill_tokens=64)
    gate = threading.Event()
    try:
        engine = budget.serving.engine
        groups = []
        prefill = engine._prefill
        monkeypatch.setattr(engine, "_prefill", lambda rows: groups.append([len(r.prompt_ids) for r in rows])
                            or prefill(rows))
        slow_decode(budget, monkeypatch, seconds=0.05)
        with Client(budget.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            running = [pool.submit(client.generate, p, "a", max_new_tokens=60, ignore_eos=True) for p in (donor, long)]
            assert wait_for(lambda: engine._prefilling is None and len(engine._batch or ()) == 2, timeout=20)
            chunked = pool.submit(client.generate, longer, "", max_new_tokens=2)  # prefilled in 2 chunks
            assert wait_for(lambda: engine._prefilling is not None, timeout=20)
            held = engine.call(gate.wait)  # the engine waits between two steps while they are queued
            replies = [pool.submit(client.generate, p, a, seed=s, **kwargs) for p, a, s in work]
            assert wait_for(lambda: scrape(budget)["loraplex_num_requests_waiting"] == 5, timeout=20)
            gate.set()
            held.result()
            assert [list(f.result().token_ids) for f in replies] == alone
            chunked.result(), [f.result() for f in running]
    finally:
        gate.set()
        budget.stop()
    # one group: the copies of the running prompts (the long one's too, while `longer` runs in chunks) and `other`
    assert [40, 40, 40, 40, 100] in [sorted(group) for group in groups]  # (in the order they reached the server)


def test_rows_sharing_a_prompt_join_a_running_batch_as_alone(runner_and_slot):
    """Joined to running rows, they are copied from the prompt's cache into the joined one (review: a batch of
    their own was made first, one more copy of them all)."""
    runner, slot = runner_and_slot
    forced = torch.tensor([[(13 * s + r) % 250 + 2 for s in range(3)] for r in range(4)])
    alone = [decode_forced(runner, [Row(p, s)], forced=forced[i:i + 1], steps=3)[0][0]
             for i, (p, s) in enumerate([(A, slot), (B, 0), (A, slot), (A, slot)])]
    running, _ = runner.prefill([Row(A, slot)])
    job = runner.start_prefill([Row(B, 0), Row(A, slot), Row(A, slot)])
    logits = runner.advance(job, job.length)
    assert job.width == 2
    joined = runner.join(running, job, runner.max_context)
    assert len(joined) == 4 and joined.cache.tensors()[0][0].shape[0] == 4
    running_logits = runner.prefill([Row(A, slot)])[1]
    together, _ = decode_from(runner, joined, torch.cat([running_logits, logits]), forced, steps=3)
    for i in range(4):
        torch.testing.assert_close(together[i], alone[i], atol=1e-5, rtol=0)


def test_the_completions_of_a_call_scoring_its_prompt_run_it_once(server, monkeypatch):
    """n completions with prompt_logprobs ran the prompt twice (two rows of one forward): completion 0, which scores
    it, apart from the others."""
    prompt = [(3 * i) % 200 + 9 for i in range(40)]
    kwargs = dict(max_new_tokens=6, ignore_eos=True, temperature=1.0, prompt_logprobs=2)
    with Client(server.target, timeout=60) as client:
        alone = [client.generate(prompt, "a", seed=7 + i, **kwargs) for i in range(3)]
        runner = server.serving.engine.runner
        shapes = []
        forward = runner._forward
        monkeypatch.setattr(runner, "_forward", lambda ids, *a, **k: shapes.append(ids.shape) or forward(ids, *a, **k))
        reply = client.generate(prompt, "a", seed=7, n=3, **kwargs)
    assert [tuple(shape) for shape in shapes if shape[1] > 1] == [(1, len(prompt))]  # once, for the three
    assert [list(c.token_ids) for c in reply.completions] == [list(a.token_ids) for a in alone]
    assert_logprobs_close(reply.prompt_logprobs, [(e.logprob, list(e.top_token_ids), list(e.top_logprobs))
                                                  for e in alone[0].prompt_logprobs], 1e-4)


def test_a_scored_prompt_shares_with_its_calls_completions_only_and_takes_no_running_rows_cache():
    from server.completions import copies
    from server.engine_messages import EngineRequest
    from server.prompt_sharing import donors, own_prefills, prompt_key, takes_cache
    from server.sampling import SamplingParams
    from server.stopping import StoppingParams

    def call(n, scored):
        return copies(EngineRequest("r", A, None, SamplingParams(), StoppingParams(4), sink=print,
                                    prompt_logprobs=1 if scored else None, completions=n), n, None)
    first, *others = call(3, scored=True)
    assert len({prompt_key(r) for r in (first, *others)}) == 1  # one prefill for the call
    assert prompt_key(call(3, scored=True)[0]) != prompt_key(first)  # another call's scores are its own
    assert prompt_key(call(1, scored=False)[0]) != prompt_key(first)
    held = {prompt_key(r): 0 for r in others}  # its copies, running before it was admitted (it waited its turn)
    assert not takes_cache(first, prompt_key(first), held) and takes_cache(others[0], prompt_key(first), held)
    # (QA) admitted beside a copy while another copy runs: the copy takes that one's cache, and the scored one,
    # whose key was given, was in neither the copies' prefill nor one of its own: admitted, never run, its call hung
    newcomers = [Row(A, 0, SimpleNamespace(request=r, prompt_key=prompt_key(r))) for r in (first, others[1])]
    donated = donors(newcomers, held)
    assert [row.state.request for row in own_prefills(newcomers, donated)] == [first]
    assert [row.state.request for rows, _ in donated.values() for row in rows] == [others[1]]

"""GenerateRequest.n: n completions of one prompt, each exactly the request sent alone with seed + i, the prompt
run once; unary replies hold them in `completions`, streams name them by `index`; bad n is INVALID_ARGUMENT; a
client that leaves frees every row, and one completion's failure ends the others; a request is prepared, resolved
(one adapter version) and queued once, all its completions or none."""
import concurrent.futures
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from clients.client import Client
from protos.loraplex.v1 import inference_pb2 as pb
from server import token_choice
from server.errors import InvalidArgument
from server.serving import waiting_for_memory
from tests.helpers import (LLAMA_TARGETS, assert_logprobs_close, lora_root, make_peft_adapter, scrape, slow_decode,
                           start_server, wait_for)

PROMPT = [(5 * i) % 200 + 9 for i in range(40)]
SAMPLED = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0, logprobs=1)


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    server = start_server(model_dirs["llama"], lora_root(model_dirs, tmp_path_factory), max_batch_size=16)
    yield server
    server.stop()


def _assert_logprobs_close(got, want) -> None:
    """Equal to the last bits torch's CPU matmul moves with the number of rows (README, `seed`)."""
    assert len(want) > 0
    assert_logprobs_close(got, [(w.logprob, list(w.top_token_ids), list(w.top_logprobs)) for w in want], 1e-5)


def _prompt_runs(server, monkeypatch) -> list:
    """The rows of every forward that runs the whole of PROMPT."""
    runner, shapes = server.serving.engine.runner, []
    forward = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda ids, *a, **k: shapes.append(ids.shape) or forward(ids, *a, **k))
    return shapes


def test_n_completions_are_the_requests_alone_with_seed_plus_i_and_run_the_prompt_once(server, monkeypatch):
    with Client(server.target, timeout=60) as client:
        alone = [client.generate(PROMPT, "a", seed=(2 ** 64 - 2 + i) % 2 ** 64, **SAMPLED) for i in range(4)]  # wraps
        success = 'loraplex_request_success_total{finished_reason="length"}'
        before = scrape(server).get(success, 0)
        shapes = _prompt_runs(server, monkeypatch)
        # 8 steps take >= 0.8 s: completions queued after the first was admitted find it running, and copy its prompt
        slow_decode(server, monkeypatch, seconds=0.1)
        reply = client.generate(PROMPT, "a", seed=2 ** 64 - 2, n=4, request_id="four", **SAMPLED)
    assert sum(rows for rows, columns in shapes if columns == len(PROMPT)) == 1
    assert len({tuple(one.token_ids) for one in alone}) > 1  # the seeds drew different samples
    assert reply.request_id == "four" and reply.text == "" and not reply.token_ids and not reply.logprobs
    assert reply.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert [c.index for c in reply.completions] == [0, 1, 2, 3]
    for completion, one in zip(reply.completions, alone):
        assert (completion.text, list(completion.token_ids)) == (one.text, list(one.token_ids))
        _assert_logprobs_close(completion.logprobs, one.logprobs)
        assert completion.finish_reason == one.finish_reason == pb.FINISH_REASON_LENGTH
        assert completion.completion_tokens == one.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == len(PROMPT) and reply.usage.completion_tokens == 32
    assert scrape(server)[success] == before + 4  # each completion is one request to the metrics


def test_greedy_completions_are_all_the_greedy_reply_and_n_1_fills_completions(server):
    with Client(server.target, timeout=60) as client:
        greedy = client.generate(PROMPT, "", max_new_tokens=6)
        both = client.generate(PROMPT, "", max_new_tokens=6, n=2)
        one = client.generate(PROMPT, "", max_new_tokens=6, n=1)
    assert [list(c.token_ids) for c in both.completions] == [list(greedy.token_ids)] * 2
    assert len(one.completions) == 1 and one.completions[0].text == greedy.text and one.text == ""
    assert one.usage == greedy.usage


def test_a_stream_names_each_completion_by_index_and_ends_each_once(server):
    with Client(server.target, timeout=60) as client:
        unary = client.generate(PROMPT, "a", seed=5, n=3, prompt_logprobs=1, **SAMPLED)
        messages = list(client.generate_stream(PROMPT, "a", seed=5, n=3, prompt_logprobs=1, **SAMPLED))
    assert len({m.request_id for m in messages}) == 1 and len(messages[0].request_id) == 32  # one made-up id
    for completion in unary.completions:
        own = [m for m in messages if m.index == completion.index]
        assert [m.finish_reason != 0 for m in own] == [False] * (len(own) - 1) + [True]  # its last message ends it
        assert "".join(m.text for m in own) == completion.text
        assert [t for m in own for t in m.token_ids] == list(completion.token_ids)
        _assert_logprobs_close([lp for m in own for lp in m.logprobs], completion.logprobs)
        assert own[-1].usage == pb.Usage(prompt_tokens=len(PROMPT), completion_tokens=8)
    # the prompt's log-probabilities come once, with completion 0's first message, as the unary reply's
    scored = [m for m in messages if m.prompt_logprobs]
    assert len(scored) == 1 and scored[0].index == 0 and scored[0] == next(m for m in messages if m.index == 0)
    _assert_logprobs_close(scored[0].prompt_logprobs, unary.prompt_logprobs)
    assert len(unary.prompt_logprobs) == len(PROMPT) - 1
    assert list(unary.prompt_token_ids) == PROMPT


@pytest.mark.parametrize("n", [0, 17, 2 ** 32 - 1])
def test_n_out_of_range_is_invalid_argument(server, n):
    with Client(server.target, timeout=30) as client:
        for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
            with pytest.raises(grpc.RpcError) as err:
                call("hi", "", n=n)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == f"n is {n}: completions of one prompt must be 1 to 16"
        for bad in (-1, 2 ** 32):
            with pytest.raises(ValueError, match="n must be"):
                client.generate("hi", "", n=bad)


def _outcomes(server) -> dict:
    """Every request_success_total / request_failure_total sample."""
    return {k: v for k, v in scrape(server).items() if k.startswith(("loraplex_request_success_total",
                                                                      "loraplex_request_failure_total"))}


def _counted(server, before: dict) -> dict:
    """What changed in the outcome counters since `before`, once the server has settled."""
    assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0
                    and scrape(server)["loraplex_num_requests_waiting"] == 0, timeout=20)
    after = _outcomes(server)
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


@pytest.mark.parametrize("adapter, tokens, code", [("missing", 4, "NOT_FOUND"), ("a", 10 ** 8, "OUT_OF_RANGE")])
def test_a_request_refused_before_its_completions_are_queued_is_counted_once(server, adapter, tokens, code):
    """(review) Each completion refused on its own: the call's one failure, plus siblings counted as cancels or not
    at all, by timing. Now the request is prepared once and refused once."""
    with Client(server.target, timeout=30) as client:
        before = _outcomes(server)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi", adapter, n=4, max_new_tokens=tokens)
    assert err.value.code().name == code
    assert _counted(server, before) == {f'loraplex_request_failure_total{{code="{code}"}}': 1}


def test_more_completions_than_the_server_ever_queues_are_refused_before_any_runs(model_dirs, server, monkeypatch):
    """(review) n=16 with 4 rows and --max-queue-size 8 could never fit, yet its first completions ran, and the
    client got tokens before RESOURCE_EXHAUSTED "the waiting queue is full"."""
    small = start_server(model_dirs["llama"], server.serving.config.adapter_root, max_batch_size=4, max_queue_size=8)
    try:
        shapes = _prompt_runs(small, monkeypatch)
        with Client(small.target, timeout=60) as client:
            before = _outcomes(small)
            for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
                with pytest.raises(grpc.RpcError) as err:
                    call(PROMPT, "a", n=16, max_new_tokens=4)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details() == ("n is 16, more completions than this server takes of one request at "
                                               "once: 12 (--max-batch-size 4 rows + --max-queue-size 8); ask for fewer")
            assert _counted(small, before) == {'loraplex_request_failure_total{code="INVALID_ARGUMENT"}': 2}
            assert shapes == []  # nothing of them ran
            assert len(client.generate(PROMPT, "a", n=12, max_new_tokens=2).completions) == 12  # the most it takes
    finally:
        small.stop()


def test_completions_beyond_the_adapters_queue_cap_are_refused_whole(model_dirs, server, monkeypatch):
    """Two rows and --max-queue-per-adapter 1, one request of the adapter already queued: three completions would
    put it over, and none of them is queued; once that request is admitted, they fit."""
    capped = start_server(model_dirs["llama"], server.serving.config.adapter_root, max_batch_size=2,
                          max_queue_per_adapter=1)
    gate = threading.Event()
    try:
        engine = capped.serving.engine
        with Client(capped.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
            client.generate([5], "a", max_new_tokens=1)  # read the adapter: its requests queue at once
            held = engine.call(gate.wait)  # the engine waits between two steps
            first = pool.submit(client.generate, [6], "a", max_new_tokens=2)
            assert wait_for(lambda: engine.pending_for("a") == 1, timeout=20)
            before = _outcomes(capped)
            with pytest.raises(grpc.RpcError) as err:
                client.generate(PROMPT, "a", n=3, max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queue-per-adapter" in err.value.details() and engine.pending_for("a") == 1
            gate.set()
            held.result(), first.result()
            assert len(client.generate(PROMPT, "a", n=3, max_new_tokens=2).completions) == 3
        assert _counted(capped, before) == {'loraplex_request_failure_total{code="RESOURCE_EXHAUSTED"}': 1,
                                            'loraplex_request_success_total{finished_reason="length"}': 4}
    finally:
        gate.set()
        capped.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_one_completions_failure_ends_the_call_and_cancels_the_others(server, monkeypatch, stream, caplog):
    calls = []
    real = token_choice.allowed

    def failing(matchers, vocab):  # at the fourth step, the first formatted row's format fails
        bits, failed = real(matchers, vocab)
        calls.append(1)
        if len(calls) == 4:
            failed[next(i for i, m in enumerate(matchers) if m is not None)] = InvalidArgument("format failed here")
        return bits, failed
    monkeypatch.setattr(token_choice, "allowed", failing)
    with Client(server.target, timeout=60) as client:
        before = _outcomes(server)
        with pytest.raises(grpc.RpcError) as err:
            kwargs = dict(n=4, max_new_tokens=30, regex="[a-z]{20,30}", temperature=1.0, seed=1, request_id="fmt")
            list(client.generate_stream(PROMPT, "a", **kwargs)) if stream else client.generate(PROMPT, "a", **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "format failed here"
    # the log names the completion (the call's four share its request_id)
    [line] = [r.getMessage() for r in caplog.records if "failed at a token" in r.getMessage()]
    assert re.fullmatch(r"request fmt \(completion [0-3]\) failed at a token: format failed here", line), line
    assert _counted(server, before) == {'loraplex_request_failure_total{code="INVALID_ARGUMENT"}': 1,
                                        'loraplex_request_success_total{finished_reason="cancelled"}': 3}


def test_a_replace_racing_the_completions_finds_them_all_on_one_version(model_dirs, tmp_path, monkeypatch):
    """(review) Each completion resolved the adapter apart: a LoadAdapter(replace) between them left one call's
    greedy completions on two versions (20 of 30 tries). Now all are resolved and queued under the id's lock."""
    spare, root = tmp_path / "spare", tmp_path / "root"
    for seed in (3, 5):
        make_peft_adapter(model_dirs["llama"], spare / str(seed), seed, r=8, lora_alpha=64,
                          target_modules=LLAMA_TARGETS)
    shutil.copytree(spare / "3", root / "a")
    versions = start_server(model_dirs["llama"], root)
    engine, queued = versions.serving.engine, {}
    submit = engine.submit

    def recording(*requests):  # the adapter version each completion of a call was queued with
        for request in requests:
            queued.setdefault(request.request_id, set()).add(request.adapter.key)
        return submit(*requests)
    monkeypatch.setattr(engine, "submit", recording)
    try:
        with Client(versions.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            client.load_adapter("a")
            for attempt in range(6):
                shutil.rmtree(root / "a")
                shutil.copytree(spare / ("5" if attempt % 2 == 0 else "3"), root / "a")
                call = pool.submit(client.generate, PROMPT, "a", n=16, max_new_tokens=6, ignore_eos=True,
                                   request_id=f"race{attempt}")
                time.sleep(0.002 * attempt)
                client.load_adapter("a", replace=True)
                completions = call.result().completions
                assert len({tuple(c.token_ids) for c in completions}) == 1  # greedy: one version, one answer
    finally:
        versions.stop()
    assert len(queued) == 6 and all(len(keys) == 1 for keys in queued.values()), queued


def test_completions_waiting_for_adapter_memory_count_as_requests(model_dirs, tmp_path):
    """(review) A call waiting for its adapter's host memory counted once, whatever its n, to --max-queue-size, the
    waiting gauge and GetAdapter; and an n the server never takes waited for memory before it was refused."""
    for i, name in enumerate(("small", "big")):
        make_peft_adapter(model_dirs["llama"], tmp_path / name, 10 + i, r=4 + 12 * i, lora_alpha=8,
                          target_modules=["q_proj"] if i == 0 else LLAMA_TARGETS)
    probe = start_server(model_dirs["llama"], tmp_path)
    try:
        with Client(probe.target, timeout=60) as client:
            small = client.load_adapter("small").size_bytes
    finally:
        probe.stop()
    tight = start_server(model_dirs["llama"], tmp_path, max_batch_size=4, max_queue_size=6,
                         adapter_cache_bytes=small + 16)  # 'big' never fits beside 'small' in flight
    try:
        with Client(tight.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
            holder = client.generate_stream([5, 6], "small", max_new_tokens=400, ignore_eos=True)
            next(iter(holder))
            waiting = pool.submit(client.generate, PROMPT, "big", n=4, max_new_tokens=2)
            assert wait_for(lambda: scrape(tight)["loraplex_num_requests_waiting"] == 4, timeout=20)
            assert waiting_for_memory(tight.serving, "big") == 4  # as GetAdapter and UnloadAdapter count them
            with pytest.raises(grpc.RpcError) as full:  # 4 + 3 waiting would pass --max-queue-size 6
                client.generate(PROMPT, "big", n=3, max_new_tokens=2)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4 requests already wait for adapter host memory" in full.value.details()
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as never:  # refused at once, not after the wait
                client.generate(PROMPT, "big", n=11, max_new_tokens=2)
            assert never.value.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() - started < 2
            holder.cancel()
            assert len(waiting.result().completions) == 4
        assert wait_for(lambda: scrape(tight)["loraplex_num_requests_waiting"] == 0, timeout=20)
    finally:
        tight.stop()


@pytest.mark.parametrize("scheduling", ["fair", "fifo"])
def test_completions_taken_whole_are_not_cut_when_fair_admission_gives_rows_to_others(model_dirs, server, scheduling):
    """(review) 4 rows, --max-queue-per-adapter 1: n=5 fits whole (1 + 4 free rows), then a base-model request
    arriving in the same step took a row under fair admission, and the adapter's excess refusal cut the fifth
    completion after the others had started: the call failed RESOURCE_EXHAUSTED."""
    capped = start_server(model_dirs["llama"], server.serving.config.adapter_root, max_batch_size=4,
                          max_queue_per_adapter=1, scheduling=scheduling)
    gate = threading.Event()
    try:
        engine = capped.serving.engine
        with Client(capped.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
            client.generate([5], "a", max_new_tokens=1)
            held = engine.call(gate.wait)
            call = pool.submit(client.generate, PROMPT, "a", n=5, max_new_tokens=4, ignore_eos=True)
            assert wait_for(lambda: engine.pending_for("a") == 5, timeout=20)
            base = pool.submit(client.generate, PROMPT, "", max_new_tokens=4, ignore_eos=True)
            assert wait_for(lambda: engine.pending_for("") == 1, timeout=20)
            gate.set()
            held.result()
            assert len(call.result().completions) == 5 and len(base.result().token_ids) == 4
    finally:
        gate.set()
        capped.stop()


def test_a_stream_cancelled_after_its_first_tokens_frees_every_completions_row(server):
    with Client(server.target, timeout=60) as client:
        before = _outcomes(server)
        stream = client.generate_stream(PROMPT, "a", n=3, max_new_tokens=400, ignore_eos=True, temperature=1.0)
        first = next(iter(stream))
        assert first.token_ids
        assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 3, timeout=20)
        stream.cancel()
    assert _counted(server, before) == {'loraplex_request_success_total{finished_reason="cancelled"}': 3}


def test_the_command_line_prints_each_completion_on_its_line(server):
    with Client(server.target, timeout=60) as client:
        reply = client.generate("hello", n=2, seed=1, temperature=1.0, max_new_tokens=4, ignore_eos=True)
    assert all("\n" not in c.text for c in reply.completions)
    result = subprocess.run([sys.executable, "-c", "from clients.cli import main; main()", "generate", "--target",
                             server.target, "--n", "2", "--seed", "1", "--temperature", "1", "--max-new-tokens", "4",
                             "--ignore-eos", "hello"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(c.text for c in reply.completions)
    for completion in reply.completions:
        assert f"[completion {completion.index}: length; {reply.usage.prompt_tokens} prompt + 4 completion tokens]" \
            in result.stderr

"""GenerateRequest.n: n completions of one prompt, each exactly the request sent alone with seed + i, the prompt
run once; unary replies hold them in `completions`, streams name them by `index`; bad n is INVALID_ARGUMENT; a
client that leaves frees every row, and one completion's failure ends the others."""
import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from clients.client import Client
from protos.loraplex.v1 import inference_pb2 as pb
from server.completions import merged
from tests.helpers import assert_logprobs_close, lora_root, scrape, slow_decode, start_server, wait_for

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


def test_an_unknown_adapter_is_not_found_once_for_all_completions(server):
    with Client(server.target, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi", "missing", n=4)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_stream_cancelled_after_its_first_tokens_frees_every_completions_row(server):
    with Client(server.target, timeout=60) as client:
        stream = client.generate_stream(PROMPT, "a", n=3, max_new_tokens=400, ignore_eos=True, temperature=1.0)
        first = next(iter(stream))
        assert first.token_ids
        assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 3, timeout=20)
        stream.cancel()
    assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0, timeout=20)


def test_completions_beyond_the_adapters_queue_cap_refuse_the_request_whole(model_dirs, server, monkeypatch):
    """Two rows and --max-queue-per-adapter 1: three of four completions fit, the fourth is refused, and the call
    fails RESOURCE_EXHAUSTED with nothing of it left running or queued."""
    capped = start_server(model_dirs["llama"], server.serving.config.adapter_root, max_batch_size=2,
                          max_queue_per_adapter=1)
    try:
        slow_decode(capped, monkeypatch, seconds=0.02)
        with Client(capped.target, timeout=60) as client:
            client.generate([5], "a", max_new_tokens=1)  # read the adapter: its completions queue at once
            with pytest.raises(grpc.RpcError) as err:
                client.generate(PROMPT, "a", n=4, max_new_tokens=200, ignore_eos=True)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queue-per-adapter" in err.value.details()
            assert wait_for(lambda: scrape(capped)["loraplex_num_requests_running"] == 0
                            and scrape(capped)["loraplex_num_requests_waiting"] == 0, timeout=20)
            assert len(client.generate(PROMPT, "a", n=3, max_new_tokens=2).completions) == 3  # these fit
    finally:
        capped.stop()


def test_one_completions_failure_ends_the_merge_and_closes_the_others():
    closed = []

    async def steady(name):
        try:
            for i in range(1000):
                await asyncio.sleep(0.001)
                yield name, i
        finally:
            closed.append(name)

    async def failing():
        yield "bad", 0
        await asyncio.sleep(0.01)
        raise RuntimeError("row failed")

    async def run():
        seen = []
        with pytest.raises(RuntimeError, match="row failed"):
            async for index, item in merged([steady("x"), failing(), steady("y")]):
                seen.append((index, item))
        return seen
    seen = asyncio.run(run())
    assert (1, ("bad", 0)) in seen and {index for index, _ in seen} == {0, 1, 2}
    assert sorted(closed) == ["x", "y"]  # both still-running streams closed: their requests are cancelled


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

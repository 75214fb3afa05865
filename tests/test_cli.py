"""The `loraplex` command line against a real server."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_peft_adapter, scrape, start_server, wait_for

LORAPLEX = [sys.executable, "-c", "from clients.cli import main; main()"]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "demo", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(model_dirs["llama"], root / "mixed", 4, r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                      target_modules=["q_proj", "v_proj", "down_proj"])
    s = start_server(model_dirs["llama"], root, autoload_adapters=False)
    yield s
    s.stop()


ROOT = Path(__file__).resolve().parent.parent


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAPLEX, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_generate_streams_text_and_reports_usage(server):
    result = run("generate", "--target", server.target, "--max-new-tokens", "5", "--ignore-eos", "hello")
    assert result.returncode == 0, result.stderr
    assert "[length; 5 prompt + 5 completion tokens]" in result.stderr


def test_generate_sends_its_cache_salt(server):
    salted = run("generate", "--target", server.target, "--max-new-tokens", "1", "--cache-salt", "t1", "hi")
    assert salted.returncode == 0, salted.stderr
    result = run("generate", "--target", server.target, "--cache-salt", "s" * 257, "hi")
    assert result.returncode != 0 and "cache_salt is longer than 256 characters" in result.stderr


def test_generate_prints_log_probabilities_to_stderr(server):
    from clients.client import Client
    with Client(server.target, timeout=30) as client:
        reply = client.generate("hello", max_new_tokens=3, ignore_eos=True, logprobs=2)
    result = run("generate", "--target", server.target, "--max-new-tokens", "3", "--ignore-eos", "--logprobs", "2",
                 "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply.text + "\n"  # the completion alone
    lines = [line for line in result.stderr.splitlines() if line.startswith("token ")]
    assert lines == [f"token {t}: logprob {lp.logprob:.4f}; most likely " + ", ".join(
        f"{i} {v:.4f}" for i, v in zip(lp.top_token_ids, lp.top_logprobs)) for t, lp in zip(reply.token_ids,
                                                                                         reply.logprobs)]


def test_generate_prints_prompt_log_probabilities_before_the_tokens(server):
    from clients.client import Client
    with Client(server.target, timeout=30) as client:
        reply = client.generate("hello", max_new_tokens=2, ignore_eos=True, prompt_logprobs=1, logprobs=0)
    result = run("generate", "--target", server.target, "--max-new-tokens", "2", "--ignore-eos",
                 "--prompt-logprobs", "1", "--logprobs", "0", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply.text + "\n"
    lines = [line for line in result.stderr.splitlines() if line.startswith(("prompt token ", "token "))]
    assert lines == [f"prompt token {t}: logprob {lp.logprob:.4f}; most likely {lp.top_token_ids[0]} "
                     f"{lp.top_logprobs[0]:.4f}" for t, lp in zip(reply.prompt_token_ids[1:], reply.prompt_logprobs)] \
        + [f"token {t}: logprob {lp.logprob:.4f}" for t, lp in zip(reply.token_ids, reply.logprobs)]
    assert len(lines) == 4 + 2  # "hello": 5 prompt tokens in this byte-level tokenizer
    total = sum(lp.logprob for lp in reply.prompt_logprobs)
    assert f"prompt: 4 tokens scored, logprob sum {total:.4f}, perplexity {math.exp(-total / 4):.4f}" in result.stderr


def test_info_prints_the_server_info_as_json_zeros_included(server):
    result = run("info", "--target", server.target)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model"] == server.serving.config.model and info["device"] == "cpu"
    assert info["autoload_adapters"] is False and info["limits"]["max_batch_size"] == 16
    assert info["limits"]["prefix_cache_tokens"] == "0"  # (proto3's JSON: 64-bit integers as strings)


def test_adapters_load_list_unload_and_errors(server):
    missing = run("generate", "--target", server.target, "--adapter", "demo", "hi")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "LoadAdapter" in missing.stderr
    loaded = run("adapters", "load", "--target", server.target, "demo")
    assert loaded.returncode == 0 and loaded.stdout.startswith("demo\tlora\trank=4")
    listed = run("adapters", "list", "--target", server.target)
    assert "demo\tlora" in listed.stdout
    got = run("adapters", "get", "--target", server.target, "demo")
    assert got.returncode == 0 and got.stdout.startswith("demo\tlora\trank=4") and "running=0" in got.stdout
    assert "NOT_FOUND" in run("adapters", "get", "--target", server.target, "nope").stderr
    assert got.stdout.splitlines()[1:] == ["  target modules: model.layers.{0-1}.self_attn.{q_proj,v_proj}",
                                           "  rank 4: all 4 modules"]
    ok = run("generate", "--target", server.target, "--adapter", "demo", "--max-new-tokens", "3", "hi")
    assert ok.returncode == 0 and "3 completion tokens" in ok.stderr
    assert run("adapters", "unload", "--target", server.target, "demo").stdout.strip() == "unloaded demo"
    again = run("adapters", "unload", "--target", server.target, "demo")
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr


def test_adapters_get_shows_the_ranks_of_its_modules(server):
    """`get` printed the row `list` prints: the README says it shows the ranks, which differ per module (AdaLoRA,
    rank_pattern, a ResLoRA merge)."""
    assert run("adapters", "load", "--target", server.target, "mixed").returncode == 0
    try:
        got = run("adapters", "get", "--target", server.target, "mixed")
        assert got.returncode == 0 and got.stdout.startswith("mixed\tlora\trank=4\tmodules=6\t"), got.stderr
        assert got.stdout.splitlines()[1:] == [
            "  target modules: model.layers.{0-1}.{mlp.down_proj,self_attn.q_proj,self_attn.v_proj}",
            "  rank 4 (5 modules): model.layers.0.{mlp.down_proj,self_attn.q_proj,self_attn.v_proj} "
            "model.layers.1.{mlp.down_proj,self_attn.v_proj}",
            "  rank 2 (1 module): model.layers.1.self_attn.q_proj"]
        listed = run("adapters", "list", "--target", server.target)
        assert listed.stdout.splitlines() == [got.stdout.splitlines()[0]]  # list keeps one row per adapter
    finally:
        run("adapters", "unload", "--target", server.target, "mixed")


def test_a_reader_that_leaves_ends_the_command_quietly(server):
    """`loraplex adapters list | head -1`, `loraplex generate ... | head -c 3`: a BrokenPipeError traceback. Now
    the exit status a tool that SIGPIPE ends has (141), nothing on stderr, and the stream cancelled."""
    from clients.client import Client
    with Client(server.target, timeout=30) as client:
        client.load_adapter("demo", replace=True)  # something to list
        try:
            for args, read in ((["adapters", "list"], 0),
                               (["generate", "hello", "--ignore-eos", "--max-new-tokens", "400"], 3)):
                process = subprocess.Popen([*LORAPLEX, *args, "--target", server.target], cwd=ROOT,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                process.stdout.read(read)
                process.stdout.close()  # before the write (list: the process is still starting up)
                assert process.wait(timeout=120) == 141
                assert process.stderr.read().decode() == ""
            assert wait_for(lambda: scrape(server)["loraplex_num_requests_running"] == 0)
        finally:
            client.unload_adapter("demo")


@pytest.mark.parametrize("args,name", [(["generate", "caf\udce9"], "prompt"),
                                       (["generate", "hi", "--stop", "caf\udce9"], "--stop"),
                                       (["generate", "hi", "--adapter", "caf\udce9"], "--adapter"),
                                       (["adapters", "get", "caf\udce9"], "adapter_id")])
def test_arguments_that_are_not_utf8_are_one_line_errors(server, args, name):
    """Python decodes argv bytes that are not UTF-8 (a Latin-1 terminal) to surrogates: protobuf's
    UnicodeEncodeError came out as a traceback. The subprocess passes the byte 0xe9 back."""
    result = run(*args, "--target", server.target)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: argument {name}: not valid UTF-8 (byte 0xe9 at character 4)" in result.stderr


@pytest.mark.parametrize("what", ["grpc", "metrics", "model", "threads", "grace", "stall", "device", "root",
                                  "targets", "target-pattern", "port", "cache"])
def test_serve_start_up_failures_are_one_line_errors(server, model_dirs, what):
    """A busy gRPC port fails the second server (grpcio's default SO_REUSEPORT would let it bind and take part of
    the first one's calls); a busy metrics port and a missing model directory likewise: one line, no traceback."""
    flags = {"grpc": ["--model", str(model_dirs["llama"]), "--port", str(server.ports.grpc), "--metrics-port", "0"],
             "metrics": ["--model", str(model_dirs["llama"]), "--port", "0",
                         "--metrics-port", str(server.ports.metrics)],
             "model": ["--model", "/nonexistent/model", "--port", "0", "--metrics-port", "0"]}.get(what)
    if flags is None:  # flags that cannot work: refused before anything is bound or loaded
        flags = ["--model", str(model_dirs["llama"]), "--port", "0", "--metrics-port", "0",
                 *{"threads": ["--threads", "-1"], "grace": ["--grace-period", "-1"], "device": ["--device", "gpu"],
                   "stall": ["--stream-stall-timeout", "0"],
                   "root": ["--adapter-root", "/nonexistent/root"],
                   "targets": ["--target-modules", "foo_proj,bar_proj"], "port": ["--metrics-port", "70000"],
                   "target-pattern": ["--target-modules", ".*_proj"],
                   "cache": ["--adapter-cache-bytes", "-1"]}[what]]
    result = run("serve", *flags)
    needle = {"grpc": f"cannot listen on 127.0.0.1:{server.ports.grpc}", "metrics": "cannot serve metrics on",
              "model": "--model: /nonexistent/model is not a Hugging Face model directory",
              "threads": "--threads must be >= 0", "grace": "--grace-period must be a number of seconds >= 0",
              "stall": "--stream-stall-timeout must be a number of seconds > 0",
              "device": "--device 'gpu' is not a torch device", "root": "--adapter-root /nonexistent/root is not a",
              "targets": "--target-modules: foo_proj, bar_proj matches no adaptable linear module",
              "target-pattern": "--target-modules: '.*_proj' is not a module name",
              "port": "--metrics-port must be <= 65535", "cache": "--adapter-cache-bytes must be >= 1"}[what]
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_flag_that_cannot_work_is_refused_before_torch_is_imported():
    """`loraplex serve --grace-period -1` imported torch and transformers (5-9 s here) before saying so; so did a
    --model folder that does not exist and `build-default --quick` without --out."""
    script = ("import sys\nfrom clients.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    print(e.code, 'torch' in sys.modules)")
    serve = ["serve", "--model", "/nonexistent"]
    for args, error in (([*serve, "--grace-period", "-1"], "--grace-period"),
                        ([*serve, "--max-batch-size", "0"], "--max-batch-size"),
                        ([*serve, "--adapter-root", "/nonexistent/root"], "--adapter-root"),
                        (serve, "--model: /nonexistent is not a Hugging Face model directory (no config.json)"),
                        (["build-default", "--quick"], "--quick builds a wiring check, not a usable model: give --out")):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60,
                                cwd=ROOT)
        assert result.stdout == "2 False\n" and result.stderr.startswith(f"error: {error}"), result


def test_serve_and_train_refuse_more_than_a_few_threads_per_cpu_alike(model_dirs, tmp_path):
    """`loraplex train --threads 3000` was accepted (and trained, 3000 threads per parallel region) where `serve`
    refused it: both refuse one thread beyond the bound with the same line, exit code 2, before anything is loaded."""
    import os
    too_many = str(4 * (os.cpu_count() or 1) + 1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "copy: {w} =>", "completion": " {w}"}}\n' for w in ("ab", "cd")))
    served = run("serve", "--model", str(model_dirs["llama"]), "--port", "0", "--metrics-port", "0",
                 "--threads", too_many)
    trained = run("train", "--method", "lora", "--model", str(model_dirs["llama"]), "--data", str(data),
                  "--out", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--threads", too_many)
    line = f"error: --threads {too_many} is more than 4 per CPU of this machine"
    for result in (served, trained):
        assert result.returncode == 2 and result.stderr.startswith(line), result.stderr
    assert trained.stderr.splitlines() == served.stderr.splitlines()[-1:]
    assert not (tmp_path / "out").exists()


def test_serve_reads_target_modules_as_train_does(model_dirs, tmp_path):
    """`loraplex serve --target-modules "q_proj, v_proj"` adapts both modules, as `loraplex train` with the same
    string trains both: the space once stayed in " v_proj", which matched nothing, so the server started adapting
    q_proj alone and refused the adapter trained with that very string."""
    from clients.client import Client
    root = tmp_path / "adapters"
    make_peft_adapter(model_dirs["llama"], root / "qv", 4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    proc = subprocess.Popen([*LORAPLEX, "serve", "--model", str(model_dirs["llama"]), "--adapter-root", str(root),
                             "--port", "0", "--metrics-port", "0", "--threads", "1", "--target-modules",
                             "q_proj, v_proj"], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, target = [], None
        for line in proc.stdout:
            log.append(line)
            found = re.search(r"grpc listening on (127\.0\.0\.1:\d+)", line)
            target = found.group(1) if found else target
            if " ready (" in line:
                break
        assert target and " ready (" in log[-1], "".join(log)
        assert not [line for line in log if "--target-modules" in line], "".join(log)  # no warning either
        with Client(target, timeout=30) as client:
            adapted = {name.rsplit(".", 1)[1] for name in client.server_info().adapter_target_modules}
        assert adapted == {"q_proj", "v_proj"}
        loaded = run("adapters", "load", "--target", target, "qv")
        assert loaded.returncode == 0 and loaded.stdout.startswith("qv\tlora\trank=4"), loaded.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_cuda_device_without_cuda_is_a_config_error(monkeypatch):
    import torch

    from server.config import ConfigError, ServerConfig, check_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, or a machine without a GPU
    with pytest.raises(ConfigError, match="--device cuda:1: this torch build or machine has no CUDA device"):
        check_config(ServerConfig(device="cuda:1"))


@pytest.mark.parametrize("value", ["inf", "1e10", "0", "-1", "nan"])
def test_a_timeout_no_call_could_meet_is_refused(value):
    """Each was accepted, and the call then failed at once with DEADLINE_EXCEEDED; the health probe's likewise."""
    from server.healthcheck import main as healthcheck_main
    result = run("generate", "--timeout", value, "hi")
    assert result.returncode == 2 and f"argument --timeout: {value} is not a number of seconds > 0" in result.stderr
    with pytest.raises(SystemExit) as exit_info:
        healthcheck_main(["--timeout", value])
    assert exit_info.value.code == 2


def test_values_a_request_cannot_carry_and_a_quick_build_over_the_shipped_model_are_refused():
    for flag, value in (("--seed", "-1"), ("--max-new-tokens", "3000000000")):
        result = run("generate", flag, value, "hi")
        assert result.returncode == 2 and f"argument {flag}: {value} is outside" in result.stderr, result.stderr
    result = run("build-default", "--quick")
    assert result.returncode == 2 and "give --out DIR" in result.stderr


def test_serve_warns_of_target_modules_this_model_lacks(model_dirs, caplog):
    """A name no module of this model matches (a typo, or a list shared across model families) is warned about at
    start, read as train reads it (spaces stripped); the other names are adapted."""
    from clients.client import Client
    with caplog.at_level("WARNING", logger="loraplex"):
        server = start_server(model_dirs["llama"], None, target_modules="q_proj, c_attn")
    try:
        assert "--target-modules: c_attn matches no adaptable linear module of this model" in caplog.text
        with Client(server.target, timeout=30) as client:
            adapted = {name.rsplit(".", 1)[1] for name in client.server_info().adapter_target_modules}
        assert adapted == {"q_proj"}
    finally:
        server.stop()


def test_a_command_whose_stdout_is_closed_succeeds_as_it_did(server):
    """`loraplex adapters load ... >&-`: the flush added for readers that leave (| head) met a None stdout and turned
    a command that had done its work into a traceback and exit status 1."""
    import shlex
    command = shlex.join([*LORAPLEX, "adapters", "load", "--target", server.target, "demo", "--replace"])
    result = subprocess.run(command + " >&-", shell=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    from clients.client import Client
    with Client(server.target, timeout=30) as client:  # done, as it said
        assert "demo" in [a.adapter_id for a in client.list_adapters()]

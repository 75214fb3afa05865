"""Batch training (--jobs, torchrun sharding, failures isolated) and train -> deploy -> Generate on a real server."""
import json
import re
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clients.client import Client
from loader.batch_jobs import my_share, read_jobs
from loader.train_data import DataError
from loader.train_job_spec import TrainJob
from tests.helpers import make_peft_adapter, run_cli, start_server, write_task

REPO = Path(__file__).resolve().parent.parent


def test_jobs_file_runs_all_and_reports_failures(model_dirs, tmp_path):
    data = write_task(tmp_path / "train.jsonl", 64, 0)
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"method": "lora", "data": str(data), "out": str(tmp_path / "a"), "rank": 4},
        {"method": "hydralora", "data": str(tmp_path / "broken.jsonl"), "out": str(tmp_path / "b")},
        {"method": "reslora", "data": str(data), "out": str(tmp_path / "c"), "structure": "is", "lr": 1e-3},
    ]) + "\n")
    result = run_cli("train", "--jobs", str(jobs), "--model", str(model_dirs["llama"]),
                     "--max-steps", "3", "--target-modules", "q_proj,v_proj")
    assert result.returncode == 1, result.stderr  # one job failed
    table = result.stdout.splitlines()
    row = {line.split()[0]: line for line in table if line[:1].isdigit()}
    assert " ok " in row["0"] and " ok " in row["2"]
    assert "failed" in row["1"] and "broken.jsonl:1: not valid JSON" in row["1"]
    assert (tmp_path / "a" / "adapter_model.safetensors").exists() and (tmp_path / "c" / "adapter_config.json").exists()
    assert "train lora a:" in result.stderr and "train reslora c:" in result.stderr  # each job's own progress bar


def test_under_torchrun_a_failed_job_does_not_stop_the_other_ranks(model_dirs, tmp_path):
    """torchrun stops every worker as soon as one exits non-zero: rank 0's job fails at once, rank 1's trains on
    and must finish; one table for both, exit code 1."""
    data = write_task(tmp_path / "train.jsonl", 64, 0)
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "lora", "data": str(tmp_path / "broken.jsonl"), "out": str(tmp_path / "a")})
                    + "\n" + json.dumps({"method": "lora", "data": str(data), "out": str(tmp_path / "b")}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "clients.cli",
         "train", "--jobs", str(jobs), "--model", str(model_dirs["llama"]), "--max-steps", "40", "--batch-size", "4",
         "--target-modules", "q_proj,v_proj"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert (tmp_path / "b" / "adapter_model.safetensors").exists(), result.stderr[-2000:]
    row = {line.split()[0]: line for line in result.stdout.splitlines() if line[:1].isdigit()}
    assert "failed" in row["0"] and " ok " in row["1"] and row["1"].split()[3] == "40"


def test_each_torchrun_rank_takes_its_share(monkeypatch, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"method": "lora", "data": "d", "out": f"o{i}", "lr": i + 1}) + "\n"
                            for i in range(5)))
    parsed = read_jobs(jobs, TrainJob(method=None, data=None, out=None))
    assert [j.settings.lr for j in parsed] == [1, 2, 3, 4, 5]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert [i for i, _ in my_share(parsed)[2]] == [1, 3]
    mixed = [replace(job, device=d) for job, d in zip(parsed, ["cpu", "cuda", "cpu", "cpu", "cuda"])]
    assert [j.device for _, j in my_share(mixed)[2]] == ["cuda:1", "cpu"]  # GPU jobs on this rank's own GPU


@pytest.mark.parametrize("line", ["5", "null", '[{"method": "lora"}]'])
def test_a_jobs_line_that_is_not_an_object_names_its_line(tmp_path, line):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "lora", "data": "d", "out": "o"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match="jobs.jsonl:2: expected a JSON object"):
        read_jobs(jobs, TrainJob(method=None, data=None, out=None))


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_a_jobs_file_without_jobs_is_refused(tmp_path, text):
    """QA: it trained nothing and exited 0 with an empty summary table."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(text)
    with pytest.raises(DataError, match=r"jobs.jsonl: no jobs \(one JSON object a line"):
        read_jobs(jobs, TrainJob(method=None, data=None, out=None))


@pytest.mark.parametrize("edit, says", [
    ({"out": None}, "--out must be a non-empty string, got None"),  # a TypeError traceback, naming no line
    ({"data": ["d"]}, "--data must be a non-empty string"), ({"model": None}, "--model must be a non-empty string"),
    ({"dtype": "float64"}, "--dtype must be one of ['float32', 'bfloat16', 'float16']"),  # a KeyError at its turn
    ({"rslora": "yes"}, "--rslora must be true or false"), ({"lr": 0}, "--lr must be a positive number"),
    ({"method": "reslora", "structure": "xs"}, "--structure must be one of ['bs', 'is', 'ms']"),
    # (QA) JSON true/false is a Python bool, an int: "lr": true trained at 1.0, "alpha": true wrote lora_alpha true
    ({"lr": True}, "--lr must be a positive number, got True"), ({"alpha": True}, "--alpha must be a positive number"),
    ({"max_grad_norm": True}, "--max-grad-norm must be a positive number"),
    ({"weight_decay": False}, "--weight-decay must be a non-negative number, got False"),
    ({"method": "adalora", "orth_reg_weight": True}, "--orth-reg-weight must be a non-negative number"),
    ({"dropout": False}, "--dropout must be in [0, 1), got False")])
def test_a_jobs_line_with_a_wrong_value_is_refused_naming_its_line_before_any_job_runs(tmp_path, edit, says):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "lora", "data": "d", "out": "o"}) + "\n" +
                    json.dumps({"method": "lora", "data": "d", "out": "p", **edit}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"jobs.jsonl:2: {says}")):
        read_jobs(jobs, TrainJob(method=None, data=None, out=None))


def test_train_deploy_generate(model_dirs, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = start_server(model_dirs["llama"], root, autoload_adapters=False)
    try:
        data = write_task(tmp_path / "train.jsonl", 128, 0)
        out = tmp_path / "trained" / "reverser"
        result = run_cli("train", "--method", "lora", "--model", str(model_dirs["llama"]), "--data",
                         str(data), "--out", str(out), "--max-steps", "20", "--lr", "1e-2",
                         "--deploy", server.target, "--deploy-root", str(root))
        assert result.returncode == 0, result.stderr
        assert "deployed reverser (version 1)" in result.stdout
        with Client(server.target, timeout=60) as client:
            client.load_adapter("reverser", replace=True, pin=True)
        again = run_cli("train", "--method", "lora", "--model", str(model_dirs["llama"]), "--data",
                        str(data), "--out", str(out), "--max-steps", "20", "--lr", "1e-2", "--overwrite",
                        "--deploy", server.target, "--deploy-root", str(root))
        assert again.returncode == 0, again.stderr
        assert "deployed reverser (version 3, pinned)" in again.stdout  # a deploy keeps the id's pin
        prompt = [5, 6, 7, 8]
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), out).eval()
        want = peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, len(prompt):].tolist()
        with Client(server.target, timeout=60) as client:
            assert list(client.generate(prompt, "reverser", max_new_tokens=8, ignore_eos=True).token_ids) == want
    finally:
        server.stop()


def test_install_flips_a_symlink_and_keeps_one_previous_version(model_dirs, tmp_path):
    from loader.deploy import install
    root = tmp_path / "root"
    versions = [make_peft_adapter(model_dirs["llama"], tmp_path / f"src{i}", 10 + i, r=4, lora_alpha=64,
                                  target_modules=["q_proj", "v_proj"]) for i in range(3)]
    shutil.copytree(versions[0], root / "a")  # a plain directory: moved aside and kept, never removed
    (root / "a" / "notes.txt").write_text("mine")
    server = start_server(model_dirs["llama"], root)
    try:
        with Client(server.target, timeout=60) as client:
            outputs = [client.generate([5, 6, 7], "a", max_new_tokens=6, ignore_eos=True).token_ids]
            for i in (1, 2):
                before = os.readlink(root / "a") if (root / "a").is_symlink() else None
                version, previous = install(versions[i], root, "a")
                assert os.readlink(root / "a") == version.name and (before is None or previous.name == before)
                assert (root / "a").is_symlink()
                assert client.load_adapter("a", replace=True).version == i + 1
                outputs.append(client.generate([5, 6, 7], "a", max_new_tokens=6, ignore_eos=True).token_ids)
        assert len({tuple(o) for o in outputs}) == 3  # each deploy really serves its own weights
        hidden = sorted(p.name for p in root.iterdir() if p.name.startswith(".a@") and "@0-replaced-" not in p.name)
        assert len(hidden) == 2 and os.readlink(root / "a") in hidden  # the current one and the one before
        [kept] = root.glob(".a@0-replaced-*")
        assert (kept / "notes.txt").read_text() == "mine"
    finally:
        server.stop()


def test_deploys_of_one_id_at_once_each_leave_a_version_the_server_can_read(model_dirs, tmp_path):
    """Two deploys of an id at the same moment (two trainers, a batch's ranks) take turns: each install pruned the
    versions it had not made or replaced, the other's included, and the id was left a link to nothing (17 of 30)."""
    import threading

    from loader.deploy import deploy
    root = tmp_path / "root"
    root.mkdir()
    sources = [make_peft_adapter(model_dirs["llama"], tmp_path / f"r{r}", r, r=r, lora_alpha=8,
                                 target_modules=["q_proj"]) for r in (2, 4)]
    server = start_server(model_dirs["llama"], root)
    try:
        for _ in range(4):
            results, threads = [], [threading.Thread(target=lambda s=s: results.append(
                deploy(s, server.target, root, adapter_id="a")[0].rank)) for s in sources]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(results) == [2, 4]  # both deployed, each reporting its own
            assert (root / "a").resolve().is_dir()
            with Client(server.target, timeout=60) as client:  # what a restart or an eviction would read again
                client.unload_adapter("a")
                assert client.load_adapter("a").rank in (2, 4)
    finally:
        server.stop()


def test_a_deploy_the_server_refuses_is_rolled_back(model_dirs, tmp_path):
    """The new files go under the root, LoadAdapter refuses them (rank above --max-lora-rank): the id points at
    the version it served before, so an auto-load after eviction or a restart never reads the refused files."""
    from loader.deploy import DeployError, deploy, install
    root = tmp_path / "root"
    root.mkdir()
    good = make_peft_adapter(model_dirs["llama"], tmp_path / "good", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    wide = make_peft_adapter(model_dirs["llama"], tmp_path / "wide", 2, r=32, lora_alpha=8, target_modules=["q_proj"])
    live, _ = install(good, root, "a")
    server = start_server(model_dirs["llama"], root, max_lora_rank=8)
    try:
        with pytest.raises(DeployError, match="did not load 'a' .* FAILED_PRECONDITION") as refusal:
            deploy(wide, server.target, root, adapter_id="a")
        assert refusal.value.refused  # no retry helps: train's advice says what would (test below)
        assert os.readlink(root / "a") == live.name
        assert {p.name for p in root.iterdir()} == {"a", live.name, ".deploy-lock"}
        with pytest.raises(DeployError):
            deploy(wide, server.target, root, adapter_id="b")  # a new id: nothing stays behind
        assert {p.name for p in root.iterdir()} == {"a", live.name, ".deploy-lock"}
        with Client(server.target, timeout=60) as client:
            assert client.load_adapter("a", replace=True).rank == 4
    finally:
        server.stop()


def test_deploy_checks_ids_before_training(tmp_path):
    """Two outputs deploying as one id, or an output that is the version the server reads (a deploy's link), are
    refused before any training; an output reached through a link deploys under the name given."""
    from loader.deploy import DeployError, adapter_id_for, check, install
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DeployError, match="would both deploy as adapter id 'x'"):
        check("127.0.0.1:1", root, [tmp_path / "a" / "x", tmp_path / "b" / "x"])
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text("{}")
    (trained / "adapter_model.safetensors").write_bytes(b"")
    install(trained, root, "live")
    with pytest.raises(DeployError, match="is the version of 'live' the server reads now"):
        check("127.0.0.1:1", root, [root / "live"])
    (tmp_path / "latest").symlink_to(trained)
    assert adapter_id_for(tmp_path / "latest") == "latest"


def test_a_jobs_line_may_spell_out_other_methods_defaults(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "adalora", "data": "d", "out": "o", "rslora": False, "heads": 4,
                                "structure": "bs", "pre_num": 1}) + "\n")
    assert read_jobs(jobs, TrainJob(method=None, data=None, out=None))[0].method == "adalora"


def test_jobs_that_cannot_run_are_refused_before_any_trains(model_dirs, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "nope", "data": "d", "out": "o"}) + "\n")
    with pytest.raises(DataError, match="jobs.jsonl:1: 'method' must be one of"):
        read_jobs(jobs, TrainJob(method=None, data=None, out=None))
    jobs.write_text(json.dumps({"method": "lora", "data": "d", "out": str(tmp_path / "o")}) + "\n")
    result = run_cli("train", "--jobs", str(jobs), "--model", str(model_dirs["llama"]), "--heads", "3")
    assert result.returncode == 2 and "--heads is given for the jobs, but no job's method uses it" in result.stderr


def test_a_job_that_fails_before_writing_leaves_no_directory(model_dirs, tmp_path):
    from loader.training_job import run_job
    with pytest.raises(DataError):
        run_job(TrainJob(method="lora", data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "new" / "o"),
                         model=str(model_dirs["llama"])))
    assert not (tmp_path / "new" / "o").exists()


def test_an_adapter_the_server_could_not_take_is_refused_before_training(model_dirs, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = start_server(model_dirs["llama"], root, max_lora_rank=16)
    try:
        data = write_task(tmp_path / "train.jsonl", 16, 0)
        for flags in (["--method", "lora", "--rank", "32"], ["--method", "hydralora", "--rank", "8", "--heads", "4"],
                      ["--method", "reslora", "--rank", "16", "--structure", "bs"],  # merged: 16 + its predecessor's 16
                      ["--method", "hydralora", "--rank", "16", "--heads", "auto"]):  # it chooses 2 or more
            result = run_cli("train", *flags, "--model", str(model_dirs["llama"]), "--data", str(data),
                             "--out", str(tmp_path / "x"), "--deploy", server.target, "--deploy-root",
                             str(root))
            assert result.returncode == 2 and "--max-lora-rank 16" in result.stderr, result.stderr
            assert "a slot 32 wide" in result.stderr and not (tmp_path / "x").exists()
            if "auto" in flags:  # was not checked: trained, then refused
                assert "with at least 2 heads (--heads auto chooses 2 to 8)" in result.stderr
    finally:
        server.stop()


def test_resume_deploys_a_job_trained_before_but_never_deployed(model_dirs, tmp_path):
    """A deploy that failed or was cut (the server restarting, Ctrl-C) after training: --resume passed the job as
    done, exit 0, and never deployed it; now it deploys it, once, for --jobs and a single job alike."""
    root = tmp_path / "root"
    root.mkdir()
    data = write_task(tmp_path / "train.jsonl", 16, 0)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"method": "lora", "data": str(data), "out": str(tmp_path / name)}) + "\n"
                            for name in ("j0", "j1")))
    common = ["--model", str(model_dirs["llama"]), "--max-steps", "2", "--target-modules", "q_proj"]
    assert run_cli("train", "--jobs", str(jobs), *common).returncode == 0  # trained, not deployed (a failed deploy)
    server = start_server(model_dirs["llama"], root)
    try:
        deploy = ["--deploy", server.target, "--deploy-root", str(root), "--resume"]
        for expected in ("deployed", "skipped"):  # deployed now, then nothing left to do
            result = run_cli("train", "--jobs", str(jobs), *common, *deploy)
            assert result.returncode == 0, result.stdout + result.stderr
            rows = [line for line in result.stdout.splitlines() if line[:1].isdigit()]
            assert len(rows) == 2 and all(f" {expected} " in row for row in rows), result.stdout
        with Client(server.target, timeout=30) as client:
            assert {a.adapter_id: a.version for a in client.list_adapters()} == {"j0": 1, "j1": 1}
        single = ["train", "--method", "lora", "--data", str(data), "--out", str(tmp_path / "s"), *common]
        assert run_cli(*single).returncode == 0
        for _ in range(2):
            result = run_cli(*single, *deploy)
            assert result.returncode == 0, result.stderr
        with Client(server.target, timeout=30) as client:
            assert client.get_adapter("s").version == 1  # deployed once
    finally:
        server.stop()


@pytest.mark.parametrize("refused, advice", [
    (False, "the same command with --resume deploys it$"),
    (True, "the same command with --resume once the server takes it .*or retrain it with other settings "
           r"\(--overwrite\)$")])
def test_a_deploy_that_failed_after_training_advises_what_helps(monkeypatch, tmp_path, refused, advice):
    """QA: a refusal that no retry changes (a limit) advised '--resume deploys it', which failed the same way."""
    import argparse

    import loader.deploy
    from clients.train_cli import _deploy_trained
    from loader.deploy import DeployError
    from loader.train_job_spec import JobError, TrainJob

    def deploy(*args, **kwargs):
        raise DeployError("127.0.0.1:1 did not load 'x' (the root is as it was): FAILED_PRECONDITION: ...",
                          refused=refused)
    monkeypatch.setattr(loader.deploy, "deploy", deploy)
    args = argparse.Namespace(deploy="127.0.0.1:1", deploy_root=str(tmp_path), token_file=None, tls_ca=None,
                              tls=False, tls_cert=None, tls_key=None)
    with pytest.raises(JobError, match="trained and saved to .*, but not deployed: .*; " + advice):
        _deploy_trained(TrainJob(method="lora", data="d.jsonl", out=str(tmp_path / "x")), args, {"served": {}})

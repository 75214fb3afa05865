"""`loraplex train --jobs ... --resume` after an interrupt: the same command goes on where the batch stopped."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.training import TrainSettings
from loader.train_job_spec import TrainJob
from loader.training_job import run_job
from tests.helpers import write_task


class _Interrupt:
    """A progress bar that presses Ctrl-C after `after` optimizer steps (the trainer calls update once a step)."""

    def __init__(self, after: int) -> None:
        self.after, self.steps = after, 0

    def update(self, n: int) -> None:
        self.steps += n
        if self.steps >= self.after:
            raise KeyboardInterrupt

    def set_postfix(self, **_) -> None:
        pass


def test_jobs_resume_skips_finished_resumes_interrupted_and_starts_the_rest(model_dirs, tmp_path, capsys,
                                                                           monkeypatch):
    import torch

    from clients import cli
    data = write_task(tmp_path / "train.jsonl", 32, 0)
    lines = [{"method": "lora", "data": str(data), "out": str(tmp_path / f"j{i}"), "max_steps": steps,
              "eval_every": 2} for i, steps in ((1, 2), (2, 6), (3, 2))]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--model", str(model_dirs["llama"]), "--batch-size", "4", "--target-modules", "q_proj"]

    def job(line):
        return TrainJob(method="lora", data=line["data"], out=line["out"], model=str(model_dirs["llama"]),
                        target_modules=["q_proj"], settings=replace(TrainSettings(), batch_size=4,
                                                                   max_steps=line["max_steps"], eval_every=2))
    # what an interrupt during job 2 leaves: job 1 done, job 2 checkpointed at step 2, job 3 never started
    run_job(job(lines[0]))
    with pytest.raises(KeyboardInterrupt):
        run_job(job(lines[1]), progress=lambda steps: _Interrupt(3))
    assert (tmp_path / "j2" / "checkpoint.pt").exists() and not (tmp_path / "j2" / "adapter_config.json").exists()
    done = (tmp_path / "j1" / "adapter_model.safetensors").stat().st_mtime_ns
    loaded, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: loaded.append(Path(path).parent.name) or load(path, **kw))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--jobs", str(jobs), "--resume", *common])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    row = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert " skipped " in row["0"] and "(done)" in row["0"]
    assert " ok " in row["1"] and row["1"].split()[3] == "6" and " ok " in row["2"]
    assert (tmp_path / "j1" / "adapter_model.safetensors").stat().st_mtime_ns == done  # not retrained
    losses = json.loads((tmp_path / "j2" / "training_log.json").read_text())["train_loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6] and loaded == ["j2"]  # j2 resumed, not restarted
    assert (tmp_path / "j3" / "adapter_config.json").exists()
    # a finished adapter of another configuration is neither passed as done nor silently retrained
    lines[0]["max_steps"] = 3
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--jobs", str(jobs), "--resume", *common])
    out = capsys.readouterr().out
    row = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert exit_info.value.code == 1 and "failed" in row["0"]
    assert "holds an adapter trained with another configuration (max_steps: 2 then, 3 now)" in row["0"]
    assert " skipped " in row["1"] and " skipped " in row["2"]
    # as that error says, --overwrite trains it over: from the start (its leftover checkpoint is the old job's);
    # interrupted meanwhile (the old adapter and log still there), the same command goes on from the new checkpoint
    lines[0]["max_steps"] = 6
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    retrain = replace(job(lines[0]), overwrite=True, resume=True)
    with pytest.raises(KeyboardInterrupt):
        run_job(retrain, progress=lambda steps: _Interrupt(3))
    assert json.loads((tmp_path / "j1" / "training_log.json").read_text())["job"]["settings"]["max_steps"] == 2
    loaded.clear()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--jobs", str(jobs), "--resume", "--overwrite", *common])
    out = capsys.readouterr().out
    row = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert exit_info.value.code == 0, out
    assert " ok " in row["0"] and row["0"].split()[3] == "6" and loaded == ["j1"]
    losses = json.loads((tmp_path / "j1" / "training_log.json").read_text())["train_loss"]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]  # steps 1-2 from the checkpoint's log, not trained again


def test_a_run_interrupted_after_writing_its_adapter_finishes_with_resume(model_dirs, tmp_path):
    """The adapter is written before training_log.json: an interrupt between them left an --out that neither
    --resume (it asked for --overwrite, which retrains) nor a --jobs --resume run (failed) would finish."""
    from loader.train_job_spec import JobError
    job = TrainJob(method="lora", data=str(write_task(tmp_path / "train.jsonl", 32, 0)), out=str(tmp_path / "o"),
                   model=str(model_dirs["llama"]), target_modules=["q_proj"],
                   settings=replace(TrainSettings(), batch_size=4, max_steps=4, eval_every=2))
    whole = run_job(job)
    adapter = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "o" / "training_log.json").unlink()
    with pytest.raises(JobError, match="interrupted before it wrote training_log.json; pass --resume"):
        run_job(job)
    finished = run_job(replace(job, resume=True))
    assert finished["train_loss"] == whole["train_loss"] and finished["steps"] == 4
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((tmp_path / "o" / "training_log.json").read_text())["job"] == whole["job"]

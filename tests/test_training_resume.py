"""What a training run leaves in --out and how the next run goes on from it: a resume continues exactly, a changed
setting is refused unless --overwrite, a run that diverges writes no adapter."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapters.lora import add_lora
from adapters.training import Trainer
from loader.train_data import read_jsonl
from loader.train_job_spec import JobError
from loader.training_job import run_job
from tests.helpers import FAST, training_job as job


def test_resume_continues_exactly(model_dirs, data):
    from loader.default_model import build_tokenizer
    train = read_jsonl(data[0], build_tokenizer(), 64)
    settings = replace(FAST, max_steps=24, eval_every=8, grad_accum=2, batch_size=8)

    def fresh():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).requires_grad_(False)
        return model, add_lora(model, ["q_proj", "v_proj"], 4, 8, dropout=0.1)

    model, layers = fresh()
    whole = Trainer(model, settings, 0).run(train)
    straight = {n: l.lora_B.weight.clone() for n, l in layers.items()}

    class Stop(Exception):
        pass
    saved = {}

    def crash_at_16(state):
        if state["step"] == 16:
            saved.update(state)
            raise Stop
    model, layers = fresh()
    with pytest.raises(Stop):
        Trainer(model, settings, 0).run(train, checkpoint=crash_at_16)
    model, layers = fresh()  # a new process: fresh weights, everything else from the checkpoint
    resumed = Trainer(model, settings, 0).run(train, resume=saved)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_B.weight, straight[name], atol=0, rtol=0)
    # the log is the whole run's, not only what ran after the resume
    assert resumed.train_loss == whole.train_loss and len(whole.train_loss) == 24 and resumed.tokens == whole.tokens


def test_reslora_resume_keeps_the_merge_statistics(model_dirs, data, tmp_path):
    """Resuming from the final checkpoint runs no training forward: the statistics the merges use (and so the
    merged weights the server serves) come from the checkpoint, equal to the uninterrupted run's."""
    settings = replace(FAST, max_steps=12, eval_every=6)
    run_job(job(model_dirs, data, tmp_path / "r", "reslora", structure="is", settings=settings))
    first = (tmp_path / "r" / "adapter_config.json").read_text()
    run_job(job(model_dirs, data, tmp_path / "r", "reslora", structure="is", settings=settings, resume=True,
                overwrite=True))
    assert (tmp_path / "r" / "adapter_config.json").read_text() == first and "NaN" not in first
    config = json.loads(first)  # served with the merge that measured best on the eval data
    assert set(config["merge_error"]) == {"input_norm", "weight_norm"}
    assert config["merge_method"] == min(config["merge_error"], key=config["merge_error"].get)


def test_job_resume_uses_the_checkpoint_and_refuses_another_config(model_dirs, data, tmp_path):
    settings = replace(FAST, max_steps=12, eval_every=6)
    run_job(job(model_dirs, data, tmp_path / "r", "lora", settings=settings))
    first = load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert (tmp_path / "r" / "checkpoint.pt").exists()
    # resuming from the final checkpoint restores the trained weights and writes the same adapter
    run_job(job(model_dirs, data, tmp_path / "r", "lora", settings=settings, resume=True, overwrite=True))
    again = load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    shutil.copytree(tmp_path / "r", tmp_path / "cut")  # as an interrupt leaves it: a checkpoint, no adapter yet
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_log.json"):
        (tmp_path / "cut" / name).unlink()
    with pytest.raises(JobError, match=r"different job configuration \(rank: 8 then, 4 now\); pass --overwrite"):
        run_job(job(model_dirs, data, tmp_path / "cut", "lora", rank=4, settings=settings, resume=True))
    with pytest.raises(JobError, match=r"different job configuration \(max_steps: 12 then, 24 now\)"):
        run_job(job(model_dirs, data, tmp_path / "cut", "lora", settings=replace(settings, max_steps=24),
                    resume=True))
    # --overwrite starts such a job over (a finished run leaves its last checkpoint): what a fresh run writes
    run_job(job(model_dirs, data, tmp_path / "fresh", "lora", rank=4, settings=settings))
    run_job(job(model_dirs, data, tmp_path / "r", "lora", rank=4, settings=settings, resume=True, overwrite=True))
    fresh, over = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fresh", "r"))
    assert all(torch.equal(fresh[k], over[k]) for k in fresh)
    run_job(job(model_dirs, data, tmp_path / "r", "lora", settings=settings, resume=True, overwrite=True))  # back
    # the same device on another index resumes (torchrun gives a rank's jobs its own GPU): cpu:0 here
    run_job(job(model_dirs, data, tmp_path / "r", "lora", settings=settings, resume=True, overwrite=True,
                device="cpu:0"))
    # the same path with other contents would be read in another order over another number of steps
    grown = tmp_path / "grown.jsonl"
    grown.write_bytes(Path(data[0]).read_bytes())
    run_job(job(model_dirs, (grown, data[1]), tmp_path / "g", "lora", settings=settings))
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_log.json"):
        (tmp_path / "g" / name).unlink()  # interrupted
    with grown.open("a") as f:
        f.write(json.dumps({"prompt": "more", "completion": "data"}) + "\n")
    with pytest.raises(JobError, match=r"different job configuration \(data_sha256: '[0-9a-f]{64}' then, '[0-9a-f]{64}' "
                                       r"now\)"):
        run_job(job(model_dirs, (grown, data[1]), tmp_path / "g", "lora", settings=settings, resume=True))


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_a_run_whose_loss_diverges_is_the_jobs_error_and_writes_nothing(model_dirs, data, tmp_path, method):
    """QA: an AdaLoRA run whose loss went NaN pruned every rank (NaN scores), saved an adapter of no modules, reported
    success and deployed the base model under the adapter's name."""
    extra = {"init_r": 4, "target_r": 2} if method == "adalora" else {}
    with pytest.raises(JobError, match=r"the training diverged at step \d+ of 4: loss nan.*no adapter was written to "
                                       r".*its last checkpoint kept as checkpoint.pt.diverged: lower --lr \(it was "
                                       r"10000\), or train in float32"):
        run_job(job(model_dirs, data, tmp_path / "o", method, dtype="float16",
                    settings=replace(FAST, lr=1e4, max_steps=4, eval_every=1), **extra))
    assert not (tmp_path / "o" / "adapter_config.json").exists()
    assert not (tmp_path / "o" / "checkpoint.pt").exists()  # (a step before it had written one: eval_every 1)
    assert (tmp_path / "o" / "checkpoint.pt.diverged").exists()  # hours of work, perhaps: kept
    summary = run_job(job(model_dirs, data, tmp_path / "o", method, settings=replace(FAST, max_steps=2), **extra))
    assert summary["steps"] == 2  # as advised: the same job with a lower --lr, nothing in the way

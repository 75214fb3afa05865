"""`loraplex merge`: ResLoRA -> plain PEFT LoRA, with the merge error measured on eval data."""
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loader.reslora_files import save_reslora
from tests.helpers import make_reslora_model, run_cli, write_task

def merge(model_dir, adapter, out, eval_path, *extra):
    return run_cli("merge", adapter, "--out", out, "--model", model_dir, "--eval", eval_path, *extra)


def test_block_shortcut_merges_exactly_into_peft_lora(model_dirs, tmp_path):
    model, layers = make_reslora_model(model_dirs["llama"], 0, "bs", 2, ["q_proj", "v_proj", "down_proj"])
    save_reslora(layers, tmp_path / "res", {"r": 4, "lora_alpha": 8})
    eval_path = write_task(tmp_path / "eval.jsonl", 16, 2)
    result = merge(model_dirs["llama"], tmp_path / "res", tmp_path / "plain", eval_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "plain" / "merge_report.json").read_text())
    assert report["merge_method"] == "exact" and report["merge_error"] < 1e-5
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), tmp_path / "plain")
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        torch.testing.assert_close(peft.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_input_shortcut_merge_reports_its_error(model_dirs, tmp_path):
    _, layers = make_reslora_model(model_dirs["llama"], 1, "is", 1, ["q_proj", "v_proj"])
    save_reslora(layers, tmp_path / "res", {"r": 4, "lora_alpha": 8})
    eval_path = write_task(tmp_path / "eval.jsonl", 16, 2)
    for method in ("input_norm", "weight_norm"):
        result = merge(model_dirs["llama"], tmp_path / "res", tmp_path / method, eval_path, "--merge-method", method)
        assert result.returncode == 0, result.stderr
        error = json.loads((tmp_path / method / "merge_report.json").read_text())["merge_error"]
        assert 0 < error < 10 and f"merge error on eval data: {error:.3e}" in result.stdout
    bad = merge(model_dirs["llama"], tmp_path / "res", tmp_path / "x", eval_path, "--merge-method", "modified_a")
    assert bad.returncode == 2 and "does not apply to structure 'is'" in bad.stderr


def test_a_merge_on_a_conv1d_model_says_fan_in_fan_out_as_peft_expects(model_dirs, tmp_path):
    """GPT-2's Conv1D modules: the merged config said fan_in_fan_out false, and PEFT warned while loading it."""
    import warnings
    model, layers = make_reslora_model(model_dirs["gpt2"], 0, "bs", 1, ["c_attn"])
    save_reslora(layers, tmp_path / "res", {"r": 4, "lora_alpha": 8})
    result = merge(model_dirs["gpt2"], tmp_path / "res", tmp_path / "plain", write_task(tmp_path / "e.jsonl", 8, 2))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"]), tmp_path / "plain")
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        torch.testing.assert_close(peft.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_a_merge_replaces_no_adapter_unasked_and_names_a_model_of_another_architecture(model_dirs, tmp_path,
                                                                                       monkeypatch):
    """QA: `merge X --out X` replaced the ResLoRA source by its merge (its factors, chains and statistics lost), a
    merge over another adapter replaced it silently (its training_log.json left behind, which a `train --resume`
    would pass as done), and a GPT-2 --model for a Llama adapter was a traceback."""
    import pytest

    from loader.merge import merge_reslora
    from loader.train_data import DataError
    from loader.train_job_spec import JobError
    _, layers = make_reslora_model(model_dirs["llama"], 0, "bs", 1, ["q_proj", "v_proj"])
    save_reslora(layers, tmp_path / "res", {"r": 4, "lora_alpha": 8})
    source = {p.name: p.read_bytes() for p in (tmp_path / "res").iterdir()}
    with pytest.raises(JobError, match=r"--out .*/res is the ResLoRA adapter being merged"):
        merge_reslora(tmp_path / "res", tmp_path / "res" / ".." / "res", str(model_dirs["llama"]), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "res").iterdir()} == source
    merge_reslora(tmp_path / "res", tmp_path / "plain", str(model_dirs["llama"]))
    (tmp_path / "plain" / "training_log.json").write_text("{}")  # as if a trained adapter's directory
    with pytest.raises(JobError, match=r"--out .*/plain already holds adapter_config.json, adapter_model.safetensors, "
                                       r"training_log.json; pass --overwrite"):
        merge_reslora(tmp_path / "res", tmp_path / "plain", str(model_dirs["llama"]))
    bad = write_task(tmp_path / "bad.jsonl", 2, 0)
    bad.write_text(bad.read_text() + "not json\n")
    with pytest.raises(DataError):  # a merge that fails leaves the directory as it was
        merge_reslora(tmp_path / "res", tmp_path / "plain", str(model_dirs["llama"]), str(bad), overwrite=True)
    assert (tmp_path / "plain" / "training_log.json").exists()
    import loader.merge
    monkeypatch.setattr(loader.merge, "save_canonical_as_lora", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):  # a crash while the merge is written leaves no log of another adapter beside it
        merge_reslora(tmp_path / "res", tmp_path / "plain", str(model_dirs["llama"]), overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "plain" / "training_log.json").exists()
    (tmp_path / "plain" / "training_log.json").write_text("{}")
    merge_reslora(tmp_path / "res", tmp_path / "plain", str(model_dirs["llama"]), overwrite=True)
    assert not (tmp_path / "plain" / "training_log.json").exists()
    with pytest.raises(JobError, match=r"--model .*gpt2: .*the adapter adapts model\.layers\.0\..*another "
                                       r"architecture"):
        merge_reslora(tmp_path / "res", tmp_path / "other", str(model_dirs["gpt2"]))
    assert not (tmp_path / "other").exists()

"""`loraplex train`: every kind learns and writes what the server (and PEFT, for LoRA) loads; its flags and data are
checked before anything runs (resume, overwrite and divergence: test_training_resume.py)."""
import json
import os
import re
import stat
import time
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapters.lora import add_lora
from adapters.training import Trainer
from loader.lora_files import save_lora
from loader.train_data import DataError, read_jsonl
from loader.default_model import build_model_dir
from loader.train_job_spec import DEFAULT_TARGETS, JobError, TrainJob
from loader.training_job import run_job
from tests.helpers import FAST, left_for_the_collector, run_cli, training_job as job

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method,extra", [("lora", {}), ("lora", {"rslora": True}), ("hydralora", {"heads": 3}),
                                          ("adalora", {"init_r": 6, "target_r": 2, "tinit": 5}),
                                          ("reslora", {"structure": "bs", "pre_num": 1}),
                                          ("reslora", {"structure": "is"}), ("reslora", {"structure": "ms"})])
def test_each_kind_learns_and_is_servable(model_dirs, data, tmp_path, method, extra):
    """Each kind's losses fall and its adapter is served; the finished job leaves nothing for the cyclic collector (a
    ResLoRA block and its chain referred to each other, which kept the trained model, base modules included, after
    the job: a batch of jobs runs in one process)."""
    from loader.base_model import load_base_model
    from loader.inject import base_weight, inject
    from loader.peft_files import read_adapter
    summary, left = left_for_the_collector(lambda: run_job(job(model_dirs, data, tmp_path / "a", method, **extra)))
    assert left == 0, f"{left} tensors waited for the cyclic collector"
    (_, before), (_, after) = summary["eval_loss"][0], summary["eval_loss"][-1]
    assert summary["train_loss"][-1][1] < summary["train_loss"][0][1] - 0.3
    assert after < before, summary["eval_loss"]
    base = load_base_model(str(model_dirs["llama"]), "cpu", "float32")
    _, shapes = inject(base.model)
    adapter = read_adapter(tmp_path / "a", "a", {s.name: s for s in shapes}, 64, 1,
                           base_weight=lambda n: base_weight(base.model, n))
    assert adapter.kind.value == method and adapter.modules
    if method == "adalora":  # the final budget is exact (target_r · n) even with the default tfinal = 0
        masks = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
        assert sum(map(sum, masks.values())) == 2 * len(masks)
        assert sum(f.rank for f in adapter.modules.values()) == 2 * len(masks)
    if method == "reslora":
        errors = summary["merge_error"]
        assert all(e == e and e >= 0 for e in errors.values())  # finite, recorded for every applicable merge
        if extra["structure"] == "bs":
            assert errors["exact"] < 1e-5
        config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert config["merge_error"] == errors and config["statistics"]


def test_lora_file_loads_in_peft_with_equal_logits(model_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])
    torch.manual_seed(0)
    layers = add_lora(model, ["c_attn", "c_fc"], r=4, alpha=8)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.normal_(0, 0.5)
    save_lora(layers, tmp_path / "lora", {"r": 4, "lora_alpha": 8})
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"]), tmp_path / "lora")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, peft.eval()(ids).logits, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_bf16_lora_forward_rounds_once_as_peft(model_dirs, tmp_path):
    """On a bf16 base, PEFT adds the fp32 adapter output to the base output and rounds once; rounding the adapter
    output to bf16 first trained a different function (QA: weights 0.015 apart after 3 steps)."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16)
    torch.manual_seed(0)
    layers = add_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.normal_(0, 0.5)
    save_lora(layers, tmp_path / "lora", {"r": 4, "lora_alpha": 8})
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16),
                                     tmp_path / "lora")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, peft.eval()(ids).logits, atol=0, rtol=0)


def test_peft_initialisation_and_scaling(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    layer = add_lora(model, ["q_proj"], r=4, alpha=8, use_rslora=True)["model.layers.0.self_attn.q_proj"]
    bound = 1 / layer.lora_A.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_B.weight.abs().max() == 0
    assert layer.scaling == 8 / 4 ** 0.5


def test_hydra_with_one_head_trains_exactly_like_lora(model_dirs, data, tmp_path):
    """K=1: the gate is identically 1 and the router gets no gradient, so from the same start both train alike."""
    from adapters.hydralora import add_hydralora
    train = read_jsonl(data[0], __import__("loader.default_model", fromlist=["x"]).build_tokenizer(), 64)
    models = []
    for kind in ("lora", "hydra"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).requires_grad_(False)
        layers = (add_lora(model, ["q_proj", "v_proj"], 4, 8) if kind == "lora"
                  else add_hydralora(model, ["q_proj", "v_proj"], 4, 8, heads=1))
        models.append((model, layers))
    with torch.no_grad():
        for name, hydra in models[1][1].items():
            hydra.lora_A.weight.copy_(models[0][1][name].lora_A.weight)
    for model, _ in models:
        Trainer(model, replace(FAST, max_steps=20), pad_id=0).run(train)
    for name, lora in models[0][1].items():
        hydra = models[1][1][name]
        torch.testing.assert_close(hydra.lora_A.weight, lora.lora_A.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(hydra.lora_B[0].weight, lora.lora_B.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 2), (2, 4), (1, 8)])
def test_gradient_accumulation_trains_as_the_whole_batch(model_dirs, batch_size, grad_accum):
    """An optimizer step's loss is the mean over all its labelled tokens however its examples split into
    micro-batches, the epoch's short last step too (each micro-batch's mean counted alike before: completions of 1
    and 30 tokens weighed the same, and the gradient of the last step of 12 examples was halved)."""
    from loader.train_data import IGNORE, Example
    g = torch.Generator().manual_seed(0)
    train = []
    for i in range(12):
        prompt, completion = 3 + i % 5, 1 + (29 * i) % 30  # completions of 1 to 30 tokens
        ids = torch.randint(3, 250, (prompt + completion,), generator=g).tolist()
        train.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    trained = []
    for batch, accum in ((8, 1), (batch_size, grad_accum)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).requires_grad_(False)
        layers = add_lora(model, ["q_proj", "v_proj"], 4, 8)
        result = Trainer(model, replace(FAST, max_steps=4, batch_size=batch, grad_accum=accum), pad_id=0).run(train)
        trained.append(({n: l.lora_B.weight.detach().clone() for n, l in layers.items()}, result.train_loss))
    (whole, whole_loss), (split, split_loss) = trained
    for name, weight in whole.items():
        assert weight.abs().max() > 1e-3  # it trained
        torch.testing.assert_close(split[name], weight, atol=1e-5, rtol=0)
    assert [s for s, _ in split_loss] == [1, 2, 3, 4]  # two steps an epoch: 8 examples, then the last 4
    assert [loss for _, loss in split_loss] == pytest.approx([loss for _, loss in whole_loss], abs=1e-5)


def test_adalora_final_eval_loss_is_the_saved_adapters(model_dirs, data, tmp_path):
    """The final rank budget is applied when the adapter is written, after the run's last eval: with masks every 6
    steps and none frozen, it cut ranks the log's last eval loss still counted."""
    from adapters.training import evaluate
    from loader.default_model import build_tokenizer
    seen = {}
    summary = run_job(job(model_dirs, data, tmp_path / "a", "adalora", init_r=6, target_r=1, tinit=0, tfinal=0,
                          delta_t=6, settings=replace(FAST, max_steps=10, eval_every=5)),
                      inspect=lambda model, tokenizer: seen.update(model=model))
    evaluation = read_jsonl(data[1], build_tokenizer(), 64)
    saved = evaluate(seen["model"], evaluation, 0, FAST.batch_size, "cpu")
    assert [step for step, _ in summary["eval_loss"]] == [5, 10]
    assert summary["eval_loss"][-1][1] == pytest.approx(saved, abs=1e-6)


def test_a_large_seed_orders_the_data(model_dirs):
    """(seed x 1000003 + epoch) passed the generator's 64 bits for seeds from ~1.8e13: a ValueError mid-run."""
    from adapters.training import _epoch_order
    assert sorted(_epoch_order(10, 2 ** 64 - 1, 3)) == list(range(10))


def test_same_seed_same_adapter(model_dirs, data, tmp_path):
    for out in ("x", "y"):
        run_job(job(model_dirs, data, tmp_path / out, "lora", settings=replace(FAST, max_steps=10)))
    a, b = (load_file(tmp_path / o / "adapter_model.safetensors") for o in ("x", "y"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clear_errors(model_dirs, data, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: needs a non-empty string 'text'"):
        run_job(job(model_dirs, (bad, data[1]), tmp_path / "o", "lora"))
    bad.write_text('{"text": "fine"}\n{"text": "a", "prompt": "b", "completion": "c"}\n')  # trained as text before
    with pytest.raises(DataError, match=r"bad.jsonl:2: has 'text' and prompt: give either text"):
        run_job(job(model_dirs, (bad, data[1]), tmp_path / "o", "lora"))
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        run_job(job(model_dirs, (bad, data[1]), tmp_path / "o", "lora"))
    bad.write_text('{"text": "fine"}\n' + "[" * 200_000 + "\n")  # a RecursionError traceback before
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON \(nested too deeply\)"):
        run_job(job(model_dirs, (bad, data[1]), tmp_path / "o", "lora"))
    bad.write_text('{"text": "fine"}\n{"text": "x", "n": ' + "1" * 5000 + "}\n")  # a ValueError traceback before
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON \(Exceeds the limit \(4300 digits\)"):
        run_job(job(model_dirs, (bad, data[1]), tmp_path / "o", "lora"))
    with pytest.raises(JobError, match="nope_proj matches no adaptable linear module.*q_proj"):
        run_job(job(model_dirs, data, tmp_path / "o", "lora", target_modules=["nope_proj"]))
    with pytest.raises(JobError, match="lm_head matches no adaptable linear module"):  # not silently dropped
        run_job(job(model_dirs, data, tmp_path / "o", "lora", target_modules=["q_proj", "lm_head"]))
    with pytest.raises(JobError, match="this model has 2 layers, so a block links back to at most 1"):
        run_job(job(model_dirs, data, tmp_path / "o", "reslora", pre_num=2))
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8 \(byte 0xe9"):
        run_job(job(model_dirs, (bad, data[1]), tmp_path / "o", "lora"))
    (tmp_path / "file").write_text("")
    with pytest.raises(JobError, match="--out .*file/o: cannot create the directory"):
        run_job(job(model_dirs, data, tmp_path / "file" / "o", "lora"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build or a machine without a GPU
    with pytest.raises(JobError, match="--device cuda: this torch build or machine has no CUDA device"):
        run_job(job(model_dirs, data, tmp_path / "o", "lora", device="cuda"))
    with pytest.raises(JobError, match=r"no budgeting phase.*tinit=50, tfinal=100, total_step=6 \(--init-r"):
        run_job(job(model_dirs, data, tmp_path / "o", "adalora", tinit=50, tfinal=100,
                    settings=replace(FAST, max_steps=6)))
    run_job(job(model_dirs, data, tmp_path / "done", "lora", settings=replace(FAST, max_steps=2)))
    with pytest.raises(JobError, match="already holds an adapter; pass --overwrite"):
        run_job(job(model_dirs, data, tmp_path / "done", "lora"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "done" / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    (tmp_path / "done" / "adapter_config.json").unlink()  # as if interrupted: only the checkpoint is there
    with pytest.raises(JobError, match="holds the checkpoint of an interrupted run; pass --resume"):
        run_job(job(model_dirs, data, tmp_path / "done", "lora"))


@pytest.mark.parametrize("method, flags, says", [
    ("lora", {"heads": 8}, "--heads applies to --method hydralora only, not lora"),
    ("hydralora", {"structure": "is"}, "--structure applies to --method reslora only, not hydralora"),
    ("reslora", {"init_r": 6}, "--init-r applies to --method adalora only, not reslora"),
    ("adalora", {"rslora": True}, "--rslora applies to lora and hydralora; adalora scales by alpha/r"),
    ("adalora", {"rank": 4}, "--rank does nothing for adalora"),
])
def test_a_flag_the_method_would_ignore_is_refused(model_dirs, data, tmp_path, method, flags, says, capsys):
    from clients import cli
    from loader.batch_jobs import read_jobs
    argv = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]
    defaults = {"heads": "4", "structure": "bs", "init_r": "12", "rank": "8"}  # given at the default: refused too
    argv_at_default = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={defaults[k]}") for k, v in flags.items()]
    for extra in (argv, argv_at_default):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--method", method, "--data", str(data[0]), "--out", str(tmp_path / "o"), *extra])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"method": method, "data": "d", "out": "o", **flags}) + "\n")
    with pytest.raises(DataError, match=f"jobs.jsonl:1: {re.escape(says)}"):
        read_jobs(lines, TrainJob(method=None, data=None, out=None))


@pytest.mark.parametrize("change,needle", [
    ({"settings": replace(FAST, eval_every=0)}, "--eval-every must be a positive integer, got 0"),
    ({"settings": replace(FAST, batch_size=0)}, "--batch-size must be a positive integer, got 0"),
    ({"settings": replace(FAST, lr=-1.0)}, "--lr must be a positive number, got -1.0"),
    ({"settings": replace(FAST, max_steps=0)}, "--max-steps must be a positive integer, got 0"),
    ({"rank": 0}, "--rank must be a positive integer, got 0"),
    ({"settings": replace(FAST, seed=2 ** 64)}, "--seed must be an integer from 0 to 2^64-1, got 18446744073709551616"),
    ({"settings": replace(FAST, seed=-1)}, "--seed must be an integer from 0 to 2^64-1, got -1"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1), got 1.0"),
    ({"heads": "x"}, "--heads must be a positive integer, got 'x' (or auto)"),
])
def test_out_of_range_settings_are_refused_before_loading(model_dirs, data, tmp_path, change, needle):
    with pytest.raises(JobError) as info:
        run_job(job(model_dirs, data, tmp_path / "o", "hydralora", **change))
    assert needle in str(info.value) and not (tmp_path / "o").exists()


def test_examples_cut_to_max_length_are_reported(tmp_path, caplog):
    from loader.default_model import build_tokenizer
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a b", "completion": " c" * n}) + "\n" for n in (2, 40, 50)))
    with caplog.at_level("WARNING", logger="loraplex.train"):
        examples = read_jsonl(path, build_tokenizer(), 16)
    assert max(len(e.input_ids) for e in examples) == 16
    assert "2 of 3 examples are longer than --max-length 16 tokens" in caplog.text


def test_a_huge_line_is_cut_before_tokenizing_and_keeps_the_same_tokens(tmp_path):
    from loader.default_model import build_tokenizer
    tokenizer = build_tokenizer()
    text = " ".join(f"w{i % 97} reverse: x{i % 13} =>" for i in range(400_000))  # ~8 MB
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"prompt": "p", "completion": text}) + "\n")
    start = time.perf_counter()
    whole, completion = read_jsonl(path, tokenizer, 64)
    assert time.perf_counter() - start < 5  # tokenizing all of it takes ~10x longer and GBs of memory
    assert whole.input_ids == tokenizer(text[:20_000]).input_ids[:64]  # what tokenizing it whole would keep
    assert completion.input_ids[1:] == tokenizer(text[:20_000], add_special_tokens=False).input_ids[:63]


def test_jsonl_strings_may_hold_unicode_line_separators(model_dirs, tmp_path):
    from transformers import AutoTokenizer
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b\x85c =>", "completion": " d"}, ensure_ascii=False) + "\n"
                    + json.dumps({"text": "e\u2029f"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as ensure_ascii=False does
    assert len(read_jsonl(path, AutoTokenizer.from_pretrained(model_dirs["llama"]), 64)) == 2


def test_heads_auto_with_identical_prompts():
    from loader.heads import choose_heads
    assert choose_heads(["Summarize:"] * 10) == 2


@pytest.mark.parametrize("tasks, heads", [(["reverse"], 2), (["double", "swap", "rotate"], 3),
                                          (["copy", "upper", "first", "last", "count"], 5)])
def test_heads_auto_finds_the_tasks_in_templated_prompts(tasks, heads):
    """One head per task (at least 2): the tasks' shared wording, not their random inputs, decides."""
    from loader.builtin_tasks import examples
    from loader.heads import choose_heads
    assert choose_heads([e["prompt"] for e in examples(tasks, 300, 1)]) == heads


def test_cli_train_end_to_end(model_dirs, data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from clients.cli import main; main()", "train", "--method", "hydralora", "--model",
         str(model_dirs["llama"]), "--data", str(data[0]), "--eval", str(data[1]), "--out", str(tmp_path / "h"),
         "--max-steps", "6", "--heads", "auto", "--target-modules", "gate_proj,up_proj", "--max-length", "20"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "hydralora\tsteps=6" in result.stdout and "train hydralora" in result.stderr  # tqdm bar
    assert "were cut to it" in result.stderr  # what it logs
    assert json.loads((tmp_path / "h" / "adapter_config.json").read_text())["lora_nums"] >= 2
    # The tests' in-process runs (tests.helpers.run_cli) see the same: pytest would take the log record
    result = run_cli("train", "--method", "lora", "--model", model_dirs["llama"], "--data", data[0], "--out",
                     tmp_path / "l", "--max-steps", "1", "--target-modules", "q_proj", "--max-length", "20")
    assert result.returncode == 0 and "were cut to it" in result.stderr and "train lora" in result.stderr


@pytest.mark.parametrize("flags, says", [
    (["--deploy-root", "ROOT"], "--deploy HOST:PORT and --deploy-root DIR go together"),
    (["--deploy", "127.0.0.1:1"], "--deploy HOST:PORT and --deploy-root DIR go together"),  # would serve old files
    (["--deploy", "127.0.0.1:1", "--deploy-root", "ROOT/missing"], "is not a directory"),
    (["--deploy", "127.0.0.1:1", "--deploy-root", "ROOT"], "cannot deploy to 127.0.0.1:1: UNAVAILABLE"),
])
def test_cli_checks_a_deploy_before_training(model_dirs, data, tmp_path, flags, says):
    (tmp_path / "root").mkdir()
    flags = [f.replace("ROOT", str(tmp_path / "root")) for f in flags]
    result = run_cli("train", "--method", "lora", "--model", model_dirs["llama"], "--data", data[0], "--out",
                     tmp_path / "x", *flags)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists() and not any((tmp_path / "root").iterdir())  # nothing trained or copied


def test_torch_threads_wait_passively_unless_the_environment_says(tmp_path):
    """serve and train: OpenMP threads sleep at barriers (spinning ones collapse beside other busy processes);
    libgomp reads the setting when torch loads, which this checks by having libgomp print what it uses. (Where the
    user chose, torch's libgomp is loaded alone: the same library and reading, without 3 s of torch's imports.)"""
    torch_loads = "import torch; torch.ones(2).sum()"
    gomp_loads = ("import ctypes, glob, importlib.util, os; ctypes.CDLL(glob.glob(os.path.join(importlib.util.find_spec("
                  "'torch').submodule_search_locations[0], 'lib', 'libgomp*'))[0])")
    # libgomp's own default spins 300000 times before it sleeps; PASSIVE spins 0; the user's choice stands
    for preset, spins in ((None, "'0'"), ("ACTIVE", "'30000000000'"), ("GOMP_SPINCOUNT", "'1000'")):
        script = "from clients import cli; cli._openmp_waits_passively(); " + (gomp_loads if preset else torch_loads)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env["OMP_DISPLAY_ENV"] = "VERBOSE"
        if preset == "GOMP_SPINCOUNT":
            env["GOMP_SPINCOUNT"] = "1000"
        elif preset:
            env["OMP_WAIT_POLICY"] = preset
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr
        assert f"GOMP_SPINCOUNT = {spins}" in result.stderr, result.stderr


def test_reslora_refuses_modules_outside_the_numbered_blocks(data, tmp_path):
    """OPT-350m's layout: project_in/project_out sit outside the blocks, where no residual chain can link them."""
    model = build_model_dir(tmp_path / "opt", "opt", seed=0, word_embed_proj_dim=32)
    with pytest.raises(JobError, match=r"model\.decoder\.project_in, model\.decoder\.project_out sit in no numbered "
                                       r"block; name the block modules"):
        run_job(TrainJob(method="reslora", data=str(data[0]), out=str(tmp_path / "o"), model=str(model),
                         target_modules="all-linear", settings=replace(FAST, max_steps=1)))
    assert not (tmp_path / "o").exists()


def test_default_targets_are_pefts_for_every_decoder_it_knows():
    """(QA) PEFT has defaults for gpt_bigcode, codegen, bloom and mpt (fused projections), and nemotron_h: training
    refused the first ones ("no default target modules") and took q_proj,v_proj for nemotron_h. PEFT's table, for
    the decoder-only causal LMs transformers knows, is the oracle (PEFT is no runtime dependency, so not imported)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as adalora
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
    not_decoders = {"bart", "bert", "roberta", "xlm-roberta", "electra", "rwkv"}  # encoders' decoder heads, RNN
    checked = 0
    for method, table in (("lora", lora), ("reslora", lora), ("adalora", adalora)):
        for model_type, names in table.items():
            if model_type in causal and model_type not in not_decoders and isinstance(names, list):
                ours = DEFAULT_TARGETS[method].get(model_type, DEFAULT_TARGETS[method][None])
                assert sorted(ours) == sorted(names), (method, model_type)
                checked += 1
    assert checked > 40


@pytest.mark.parametrize("arch,method", [("gpt_neox", "lora"), ("gpt_neox", "hydralora"), ("opt", "adalora"),
                                         ("gpt_bigcode", "lora"), ("gpt_bigcode", "reslora")])
def test_default_targets_follow_the_architecture(data, tmp_path, arch, method):
    """Without --target-modules a method adapts PEFT's default modules of the architecture (HydraLoRA: its FFN)."""
    model = build_model_dir(tmp_path / arch, arch, seed=0)
    extra = {"init_r": 4, "target_r": 2} if method == "adalora" else {}
    summary = run_job(TrainJob(method=method, data=str(data[0]), out=str(tmp_path / "o"), model=str(model),
                               settings=replace(FAST, max_steps=1, eval_every=1), **extra))
    assert summary["steps"] == 1 and summary["targets"] == DEFAULT_TARGETS[method][arch]


def test_an_architecture_without_default_targets_asks_for_them(data, tmp_path):
    model = build_model_dir(tmp_path / "phi3", "phi3", seed=0)
    with pytest.raises(JobError, match=r"no default target modules for lora on phi3 models: give --target-modules "
                                       r"\(this model's linear modules are named \['down_proj', 'gate_up_proj'"):
        run_job(TrainJob(method="lora", data=str(data[0]), out=str(tmp_path / "o"), model=str(model),
                         settings=replace(FAST, max_steps=1)))


def test_written_files_a_server_would_refuse_are_the_jobs_error(model_dirs, data, tmp_path, monkeypatch):
    """After writing, training reads the adapter as a server would (for the deploy check); a refusal there (factors
    that diverged to NaN, say) is the job's named error, not a traceback."""
    import loader.deploy
    from server.errors import FailedPrecondition

    def refuse(out, layers):
        raise FailedPrecondition("adapter 'o': tensor model.layers.0.self_attn.q_proj.lora_A.weight holds NaN or Inf")
    monkeypatch.setattr(loader.deploy, "served_form", refuse)
    with pytest.raises(JobError, match=r"the adapter written to .*/o cannot be served: .*holds NaN or Inf"):
        run_job(job(model_dirs, data, tmp_path / "o", "lora", settings=replace(FAST, max_steps=1)))

"""`loraplex train` input edge cases: data file encodings, odd JSON strings, --target-modules syntax, --max-length
against the model's context. Each is a `file:line: reason` or a one-line error, never a traceback or a fallback."""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.training import TrainSettings
from loader.batch_jobs import read_jobs
from loader.default_model import build_tokenizer
from loader.train_data import DataError, read_jsonl
from loader.train_job_spec import TrainJob

REPO = Path(__file__).resolve().parent.parent


def test_a_byte_order_mark_at_the_start_is_accepted(tmp_path):
    """Windows editors and PowerShell's Out-File write one; json.loads refuses it as 'Unexpected UTF-8 BOM'."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "copy: ab =>", "completion": " ab"}).encode() + b"\n"
                     + json.dumps({"text": "cd"}).encode() + b"\n")
    first, second = read_jsonl(path, build_tokenizer(), 64)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(path.read_bytes()[3:])
    assert [first, second] == read_jsonl(plain, build_tokenizer(), 64)  # the mark is not part of the first prompt
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b"\xef\xbb\xbf" + json.dumps({"method": "lora", "data": "d", "out": "o"}).encode() + b"\n")
    assert read_jobs(jobs, TrainJob(method=None, data=None, out=None))[0].method == "lora"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # offsets still count the mark
    with pytest.raises(DataError, match=r"bom.jsonl:2: not UTF-8 \(byte 0xe9 at offset 31\)"):
        read_jsonl(path, build_tokenizer(), 64)


@pytest.mark.parametrize("line, key, escape", [
    (r'{"prompt":"copy: \ud800 =>","completion":" ab"}', "prompt", r"\ud800"),
    (r'{"prompt":"copy: ab =>","completion":" a\udfffb"}', "completion", r"\udfff"),
    (r'{"text":"x \udc00"}', "text", r"\udc00"),
])
def test_a_lone_surrogate_escape_names_its_line(tmp_path, line, key, escape):
    """JSON may spell half of a UTF-16 pair (\\ud800) alone; Python then holds a string no tokenizer can encode."""
    path = tmp_path / "sur.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    says = f"sur.jsonl:2: '{key}' holds a lone UTF-16 surrogate escape ({escape})"
    with pytest.raises(DataError, match=re.escape(says)):
        read_jsonl(path, build_tokenizer(), 64)
    path.write_text(r'{"prompt": "pair: \ud83d\ude00 =>", "completion": " ok"}' + "\n")  # a pair is one character
    assert len(read_jsonl(path, build_tokenizer(), 64)) == 1


@pytest.mark.parametrize("value, parsed", [
    ("q_proj,v_proj", ["q_proj", "v_proj"]), ("q_proj, v_proj ", ["q_proj", "v_proj"]), ("q_proj", ["q_proj"]),
    (["q_proj", " mlp.down_proj"], ["q_proj", "mlp.down_proj"]), ("all-linear", "all-linear"), (None, None),
])
def test_target_modules_read_alike_from_the_flag_and_a_jobs_line(tmp_path, value, parsed):
    from loader.train_job_spec import parse_targets
    assert parse_targets(value) == parsed
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "lora", "data": "d", "out": "o", "target_modules": value}) + "\n")
    assert read_jobs(jobs, TrainJob(method=None, data=None, out=None))[0].target_modules == parsed


@pytest.mark.parametrize("value, says", [
    ("", "is empty"), ([], "is empty"), (" , ", "is empty"), ("q_proj,,v_proj", "holds an empty name"),
    ("q_proj,", "holds an empty name"), ([""], "is empty"), (".*\\.q_proj", "'.*\\\\.q_proj' is not a module name"),
    (5, "takes module names"), (["q_proj", 3], "takes module names"),
])
def test_empty_or_odd_target_modules_are_refused_not_defaulted(tmp_path, value, says):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "lora", "data": "d", "out": "o"}) + "\n"
                    + json.dumps({"method": "lora", "data": "d", "out": "p", "target_modules": value}) + "\n")
    with pytest.raises(DataError, match=r"jobs.jsonl:2: 'target_modules'.*" + re.escape(says)):
        read_jobs(jobs, TrainJob(method=None, data=None, out=None))


def test_cli_target_modules_flag_and_jobs_line_train_the_same_modules(model_dirs, tmp_path, capsys):
    from clients import cli
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"copy: {w} =>", "completion": f" {w}"}) + "\n"
                            for w in ("ab", "cd", "ef", "gh")))
    common = ["--model", str(model_dirs["llama"]), "--max-steps", "1", "--batch-size", "2"]
    for flag, says in (("", "--target-modules '': is empty"), ("q_proj,", "--target-modules 'q_proj,': holds an "
                                                                          "empty name")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--method", "lora", "--data", str(data), "--out", str(tmp_path / "x"),
                      "--target-modules", flag, *common])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--method", "lora", "--data", str(data), "--out", str(tmp_path / "flag"),
                  "--target-modules", "q_proj, v_proj", *common])
    assert exit_info.value.code == 0, capsys.readouterr().err
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"method": "lora", "data": str(data), "out": str(tmp_path / "line"),
                                "target_modules": "q_proj,v_proj"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--jobs", str(jobs), *common])
    assert exit_info.value.code == 0, capsys.readouterr()
    for out in ("flag", "line"):
        config = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert sorted({name.rsplit(".", 1)[1] for name in config["target_modules"]}) == ["q_proj", "v_proj"], out


def test_max_length_beyond_the_models_context_is_refused_naming_both(model_dirs, tmp_path):
    """GPT-2's learned positions crashed with an IndexError past n_positions; Llama's rotary ones trained silently
    on positions the server never serves. Both are refused before the data is read; at the context it trains."""
    from loader.default_model import build_model_dir
    from loader.train_job_spec import JobError
    from loader.training_job import run_job
    short = build_model_dir(tmp_path / "gpt2ctx64", "gpt2", seed=1, n_positions=64)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "copy: ab =>", "completion": " " + "ab" * 150}) + "\n")

    def job(model, out, max_length):
        return TrainJob(method="lora", data=str(data), out=str(tmp_path / out), model=str(model), max_length=max_length,
                        settings=replace(TrainSettings(), max_steps=1, batch_size=1))
    with pytest.raises(JobError, match=re.escape("--max-length 256 is longer than the context of --model ")
                       + r".*gpt2ctx64: 64 tokens \(n_positions in its config.json\); give --max-length 64 or less"):
        run_job(job(short, "a", 256))
    with pytest.raises(JobError, match=r"--max-length 1000 .*: 512 tokens \(max_position_embeddings in its config"):
        run_job(job(model_dirs["llama"], "b", 1000))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert run_job(job(short, "c", 64))["steps"] == 1


def _sentencepiece_style_tokenizer():
    """A BPE over Metaspace pre-tokens, as Llama-2's and Mistral's: "▁" marks a word's leading space, and a text's
    first word gets one too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["Q: capital of France?\nA:\n", "The capital is Paris", "Paris is a city"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_completion_is_trained_as_the_tokens_that_continue_its_prompt(tmp_path):
    """A SentencePiece tokenizer reads a completion alone as a new text: "Paris" after "A:\\n" was trained as
    "▁Paris", so the served adapter answered " Paris". Tokenized with its prompt, it is the tokens that follow the
    prompt's, which is how a served prompt is continued."""
    tokenizer = _sentencepiece_style_tokenizer()
    prompt, completion = "Q: capital of France?\nA:\n", "Paris"
    whole, alone = tokenizer(prompt + completion).input_ids, tokenizer(prompt).input_ids
    assert whole[:len(alone)] == alone and whole[len(alone):] != tokenizer(completion, add_special_tokens=False).input_ids
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    (example,) = read_jsonl(path, tokenizer, 64)
    assert example.input_ids == whole + [tokenizer.eos_token_id]
    assert example.labels == [-100] * len(alone) + whole[len(alone):] + [tokenizer.eos_token_id]
    assert tokenizer.decode(example.input_ids[len(alone):-1]) == completion


def test_a_prompt_whose_last_token_merges_with_the_completion_keeps_its_tokens_and_is_warned_about(tmp_path, caplog):
    tokenizer = _sentencepiece_style_tokenizer()  # "The capital is " ends in "▁", which "Paris" takes: "▁Paris"
    prompt, completion = "The capital is ", "Paris"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    with caplog.at_level("WARNING"):
        (example,) = read_jsonl(path, tokenizer, 64)
    assert "in 1 of 1 examples the prompt's last token merges with the completion's first" in caplog.text
    alone = tokenizer(prompt).input_ids
    assert tokenizer(prompt + completion).input_ids[:len(alone)] != alone
    assert example.input_ids == alone + tokenizer(completion, add_special_tokens=False).input_ids + \
        [tokenizer.eos_token_id]
    assert example.labels[:len(alone)] == [-100] * len(alone)


def test_a_job_recorded_with_a_device_index_resumes_on_that_device_kind():
    """Identities written before the device kind alone was recorded hold 'cuda:0': the same job, not a change."""
    from loader.train_job_spec import changes
    assert changes({"device": "cuda:0", "rank": 8}, {"device": "cuda", "rank": 8}) == []
    assert changes({"device": "cuda:0"}, {"device": "cpu"}) == ["device: 'cuda' then, 'cpu' now"]
    assert changes({"rank": 8}, {"rank": 8, "data_sha256": "ab"}) == []  # not recorded then: not compared


def test_an_example_with_no_token_to_predict_is_refused_naming_its_line(tmp_path):
    """A loss predicts each token from those before it: one token cut to --max-length 1 (or a one-token text on a
    tokenizer without BOS) has none to learn, and a micro-batch of such examples had a 0/0 loss (NaN)."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: a single token, with none before it to be predicted from"):
        read_jsonl(path, build_tokenizer(), 1)
    path.write_text(json.dumps({"prompt": "hello", "completion": " world"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: the prompt fills --max-length 3"):
        read_jsonl(path, build_tokenizer(), 3)
    assert read_jsonl(path, build_tokenizer(), 64)

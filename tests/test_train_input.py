"""`loraplex train` input edge cases: data file encodings, odd JSON strings, --target-modules syntax, --max-length
against the model's context. Each is a `file:line: reason` or a one-line error, never a traceback or a fallback."""
import json
import re
from pathlib import Path

import pytest

from loader.batch_jobs import read_jobs
from loader.default_model import build_tokenizer
from loader.train_data import DataError, read_jsonl
from loader.training_job import TrainJob

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

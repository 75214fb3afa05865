"""Adapter weights read tensor by tensor: the same tensors safetensors gives, and hostile headers refused."""
import io
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loader.tensor_bytes import TensorFileError, read_tensors_from


def test_same_tensors_as_safetensors(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7).to(torch.bfloat16), "empty": torch.zeros(0, 4),
               "h": torch.randn(2, 2).half(), "i": torch.arange(5), "d": torch.randn(3, dtype=torch.float64),
               "e4": (torch.randn(6) * 4).to(torch.float8_e4m3fn), "e5": (torch.randn(6) * 4).to(torch.float8_e5m2)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    got, want = read_tensors_from(io.BytesIO(data), len(data)), load_file(str(path))
    assert list(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k].float(), want[k].float()) for k in want)
    got["b"].mul_(2)  # each tensor owns its memory: writable, and independent of the others
    assert torch.equal(got["b"], 2 * want["b"]) and torch.equal(got["h"], want["h"])


def _file(header: dict, body: bytes) -> io.BytesIO:
    raw = json.dumps(header).encode()
    return io.BytesIO(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("header,body,needle", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),  # bytes read twice
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "do not hold 4 F32 values"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "do not hold 3 F32 values"),
    ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative integers"),
    ({"a": "x"}, b"", "malformed entry"),
    # no bytes, offsets that hold them, and a dimension no torch size can be (int64): TypeError in torch.empty before
    ({"a": {"dtype": "F32", "shape": [2 ** 64, 0], "data_offsets": [0, 0]}}, b"", "dimensions below 2"),
    ({"a": {"dtype": "F32", "shape": [0, 2 ** 63], "data_offsets": [0, 0]}}, b"", "dimensions below 2"),
])
def test_hostile_headers_are_refused(header, body, needle):
    f = _file(header, body)
    with pytest.raises(TensorFileError, match=needle):
        read_tensors_from(f, len(f.getvalue()))


def test_a_header_longer_than_the_file_and_a_file_shorter_than_checked_are_refused():
    with pytest.raises(TensorFileError, match="does not fit the file"):
        read_tensors_from(io.BytesIO(struct.pack("<Q", 1 << 40)), 8)
    f = _file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    size = len(f.getvalue())
    f = io.BytesIO(f.getvalue()[:-4])  # the file shrank after its size was checked
    with pytest.raises(TensorFileError, match="ends before its data"):
        read_tensors_from(f, size)


def test_headers_beyond_what_their_tensors_or_safetensors_take_are_refused_before_parsing():
    """A header's length is bounded by the tensors a caller can use (a million empty tensors in a 87 MiB header took
    1.2 GB before any name was checked), by safetensors' 100 MiB, and its entries by that count."""
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    f = _file({f"t{i}": entry for i in range(100)}, b"")
    assert len(read_tensors_from(io.BytesIO(f.getvalue()), len(f.getvalue()), max_tensors=100)) == 100
    with pytest.raises(TensorFileError, match="100 tensors, above the 99 an adapter can hold"):
        read_tensors_from(io.BytesIO(f.getvalue()), len(f.getvalue()), max_tensors=99)
    wide = _file({"__metadata__": {"format": "pt"}, "t": {**entry, "pad": "x" * 70_000}}, b"")
    with pytest.raises(TensorFileError, match="is above what 2 tensors take"):
        read_tensors_from(wide, len(wide.getvalue()), max_tensors=2)
    huge = 100 * 1024 * 1024 + 1
    with pytest.raises(TensorFileError, match=f"header length {huge} is above the 104857600 bytes safetensors"):
        read_tensors_from(io.BytesIO(struct.pack("<Q", huge) + b" " * huge), huge + 8)


def test_an_integer_too_long_for_python_is_a_header_that_is_not_json():
    f = _file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    raw = f.getvalue().replace(b"[4]", b"[" + b"4" * 5000 + b"]")
    raw = struct.pack("<Q", int.from_bytes(raw[:8], "little") + 4999) + raw[8:]
    with pytest.raises(TensorFileError, match="header is not JSON: Exceeds the limit"):
        read_tensors_from(io.BytesIO(raw), len(raw))

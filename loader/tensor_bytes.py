"""Read a safetensors file's tensors from an open file, each into its own buffer.

`safetensors.torch.load(bytes)` copies every tensor out of the bytes it parses, so reading the whole file
first held it twice until the read returned. Here the header is parsed and each tensor is read into a buffer
it owns: the file is held once, and nothing is memory-mapped (a file truncated in place while mapped would
kill the process with SIGBUS). Checked as safetensors checks them: known dtypes, sizes that match the
shapes, and ranges that lie within the data without overlapping, so no more bytes are read than the file has.
"""
from __future__ import annotations

import json
import math
from typing import BinaryIO

import torch

from loader import json_input

MAX_HEADER = 100 * 1024 * 1024  # what safetensors itself accepts
# Where the caller knows how many tensors a file can usefully hold: a header entry takes ~150 bytes; its parsed
# form ~10x more, and a 100 MiB header of a million empty tensors took 1.2 GB before any name was checked.
HEADER_BYTES_PER_TENSOR = 1024
HEADER_METADATA_BYTES = 64 * 1024
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorFileError(ValueError):
    """Not a safetensors file this server can read; the message says where."""


def read_tensors_from(f: BinaryIO, size: int, max_tensors: int | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor} in name order from `f`, a file of `size` bytes positioned at its start; a header with more
    than `max_tensors` entries (or longer than theirs can be) is refused before its tensors are made."""
    head = f.read(8)
    if len(head) < 8:
        raise TensorFileError(f"{len(head)} bytes: too short for a safetensors header")
    length = int.from_bytes(head, "little")
    if length > size - 8:
        raise TensorFileError(f"header length {length} does not fit the file's {size} bytes")
    if length > MAX_HEADER:
        raise TensorFileError(f"header length {length} is above the {MAX_HEADER} bytes safetensors accepts")
    if max_tensors is not None and length > HEADER_METADATA_BYTES + max_tensors * HEADER_BYTES_PER_TENSOR:
        raise TensorFileError(f"header length {length} is above what {max_tensors} tensors take "
                              f"({HEADER_BYTES_PER_TENSOR} bytes each, {HEADER_METADATA_BYTES} for metadata)")
    try:
        header = json_input.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    count = len(header) - ("__metadata__" in header)
    if max_tensors is not None and count > max_tensors:
        raise TensorFileError(f"{count} tensors, above the {max_tensors} an adapter can hold on this server")
    start, data = 8 + length, size - 8 - length
    entries = sorted((_entry(name, info, data) for name, info in header.items() if name != "__metadata__"),
                     key=lambda e: e[3])
    for previous, entry in zip(entries, entries[1:]):  # by offset: each byte is read at most once
        if entry[3] < previous[4]:
            raise TensorFileError(f"tensors {previous[0]} and {entry[0]} overlap")
    tensors = {}
    for name, dtype, shape, begin, end in entries:
        buffer = bytearray(end - begin)
        f.seek(start + begin)
        if f.readinto(buffer) != len(buffer):
            raise TensorFileError(f"tensor {name}: the file ends before its data (truncated?)")
        tensors[name] = torch.frombuffer(buffer, dtype=dtype).view(shape) if buffer else torch.empty(shape,
                                                                                                     dtype=dtype)
    return dict(sorted(tensors.items()))


def _entry(name: str, info, data: int) -> tuple[str, torch.dtype, list[int], int, int]:
    try:
        dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
    except KeyError as exc:
        raise TensorFileError(f"tensor {name}: unknown dtype or missing field {exc}") from None
    except (TypeError, ValueError):
        raise TensorFileError(f"tensor {name}: malformed entry {info!r:.200}") from None
    # dims below 2**63: torch sizes are int64 (a dimension of 2**64 next to a 0 holds no bytes, so the offsets
    # check alone would pass it on to torch.empty, which overflows)
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2 ** 63 for d in shape)
            and type(begin) is int and type(end) is int):
        raise TensorFileError(f"tensor {name}: shape and offsets must be non-negative integers, dimensions below "
                              f"2**63")
    count = math.prod(shape)
    if not 0 <= begin <= end <= data or end - begin != count * torch.empty((), dtype=dtype).element_size():
        raise TensorFileError(f"tensor {name}: offsets [{begin}, {end}] do not hold {count} {info['dtype']} "
                              f"values within the {data} data bytes")
    return name, dtype, shape, begin, end

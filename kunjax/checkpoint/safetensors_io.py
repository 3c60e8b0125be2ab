"""A small reader (and writer) for the safetensors format, over numpy memory maps.

A safetensors file is `u64 little-endian N | N bytes of JSON header | data`; the header maps every tensor name
to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data section), plus an optional
`"__metadata__"` dict of strings.

This module owns parsing and validating that layout. Its invariant: every tensor a `SafetensorsFile` lists
lies wholly inside the file and its byte range matches its dtype and shape, checked when the file is opened,
so reading a tensor can never run past the end of a truncated file; anything wrong is a `CheckpointError`
naming the file (and the tensor). Reading returns read-only views into one memory map per file: nothing is
loaded until a caller copies the slice it needs. It never casts, transposes or places arrays (that is
`kunjax.checkpoint.hf`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not match the model config.

    The message names the file (and the tensor, with expected and actual shapes, where one is at fault).
    """


# The dtypes the runtime reads; every other safetensors dtype is rejected when a tensor is read.
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}
# Item sizes of every dtype the format defines, to validate byte ranges even of tensors we will not read.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_HEADER_LIMIT = 100 * 2**20  # the reference implementation refuses headers over 100 MB as well


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section, end exclusive
    end: int


class SafetensorsFile(Mapping[str, TensorInfo]):
    """One `.safetensors` file: the header parsed and validated on open, the data mapped on first read."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: {size} bytes, too short to hold a safetensors header")
                n = int.from_bytes(head, "little")
                if n > _HEADER_LIMIT or 8 + n > size:
                    raise CheckpointError(f"{self.path}: header length {n} does not fit the file's {size} "
                                          f"bytes (truncated or not a safetensors file)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = dict(meta) if isinstance(meta, dict) else {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._tensors = {name: self._parse_entry(name, entry, data_len) for name, entry in header.items()}
        self._mmap: np.memmap | None = None

    def _parse_entry(self, name: str, entry: object, data_len: int) -> TensorInfo:
        try:
            dtype = entry["dtype"]  # type: ignore[index]
            shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
            begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}: {entry!r}") from e
        if not isinstance(dtype, str) or any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}: {entry!r}")
        if end > data_len:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} needs bytes [{begin}, {end}) of the data section but the file "
                f"holds only {data_len} (truncated file?)")
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) should span "
                f"{math.prod(shape) * _ITEMSIZE[dtype]} bytes, header says {end - begin}")
        return TensorInfo(name, dtype, shape, begin, end)

    # Mapping interface: name -> TensorInfo.
    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def tensor(self, name: str) -> np.ndarray:  # [*info.shape], read-only view into the memory map
        info = self[name]
        dtype = SUPPORTED_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {info.dtype}; kunjax reads only "
                                  f"{', '.join(SUPPORTED_DTYPES)}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + info.begin
        return self._mmap[start:start + info.end - info.begin].view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Drop the memory map; views handed out keep it alive until they are released."""
        self._mmap = None


def save_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (BF16/F16/F32 numpy arrays) as one safetensors file. Used by tests and tools."""
    names = {v: k for k, v in SUPPORTED_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in names:
            raise CheckpointError(f"{path}: cannot write tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())

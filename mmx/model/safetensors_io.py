"""Reading safetensors files one tensor at a time, straight into the memory that will hold it.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range) and the
raw data. Reading with ``readinto`` (rather than mapping the file) keeps a load's resident memory at the model's
own size plus the largest tensor that needs converting, and lets a tensor land directly in its parameter.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (bool is an int to Python, not to the format)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsReader:
    """Header of one file, and reads of single tensors from it.

    The header is checked in full before anything is read: it is a JSON object; every entry has a known dtype, a
    shape of non-negative integers and a byte range that lies inside the data section, is as long as dtype x shape
    says, and overlaps no other tensor's range. A file that breaks any of these is corrupt or hostile, and reading
    it would yield garbage (or another tensor's bytes) rather than an error."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: unreadable header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"{self.path}: __metadata__ is a {type(metadata).__name__}, not an object")
        self.metadata: dict = metadata
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry, data_start, size)
        self._check_no_overlap()

    def _entry(self, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{where}: entry is a {type(entry).__name__}, not an object")
        dtype_name = entry.get("dtype")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise SafetensorsError(f"{where} has unsupported dtype {dtype_name!r}; allowed: {', '.join(DTYPES)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
        begin, end = offsets
        if begin > end:
            raise SafetensorsError(f"{where}: data_offsets {offsets} begin after they end")
        if data_start + end > size:
            raise SafetensorsError(
                f"{where}: data_offsets {offsets} run past the {size - data_start}-byte data section "
                "(the file is truncated or the header is wrong)"
            )
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize:
            raise SafetensorsError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, but {dtype_name} {shape} "
                f"needs {numel * dtype.itemsize}"
            )
        return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)

    def _check_no_overlap(self) -> None:
        """Two tensors sharing bytes would alias each other; the format gives each its own range."""
        ranges = sorted((info.begin, info.end, name) for name, info in self.tensors.items() if info.nbytes)
        for (_, end, first), (begin, _, second) in itertools.pairwise(ranges):
            if begin < end:
                raise SafetensorsError(f"{self.path}: the byte ranges of tensors {first!r} and {second!r} overlap")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``name``; into ``out`` when given (a contiguous CPU tensor of the same dtype and shape)."""
        info = self.tensors[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous() or out.is_cuda:
            raise ValueError(f"cannot read {name!r} into a {out.dtype} {tuple(out.shape)} tensor")
        if info.nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(info.begin)
                filled = 0
                while filled < info.nbytes:
                    n = f.readinto(view[filled:])
                    if not n:
                        raise SafetensorsError(f"{self.path}: unexpected end of file reading {name!r}")
                    filled += n
        return out

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``read(name).narrow(dim, start, stop - start)``, reading only that part's bytes: one contiguous run per
        index of the dimensions before ``dim``. A rank of a sharded model loads its slices this way without ever
        holding (or mapping) the full tensor."""
        info = self.tensors[name]
        shape = list(info.shape)
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise ValueError(f"cannot take [{start}, {stop}) of dimension {dim} of {name!r} {shape}")
        out = torch.empty([*shape[:dim], stop - start, *shape[dim + 1 :]], dtype=info.dtype)
        if not out.numel():
            return out
        inner = math.prod(shape[dim + 1 :]) * info.dtype.itemsize
        run, stride = (stop - start) * inner, shape[dim] * inner
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:
            for i in range(math.prod(shape[:dim])):
                f.seek(info.begin + i * stride + start * inner)
                filled = 0
                while filled < run:
                    n = f.readinto(view[i * run + filled : (i + 1) * run])
                    if not n:
                        raise SafetensorsError(f"{self.path}: unexpected end of file reading {name!r}")
                    filled += n
        return out

"""Reading safetensors files one tensor at a time, straight into the memory that will hold it.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range) and the
raw data. Reading with ``readinto`` (rather than mapping the file) keeps a load's resident memory at the model's
own size plus the largest tensor that needs converting, and lets a tensor land directly in its parameter.
"""

from __future__ import annotations

import json
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


class SafetensorsReader:
    """Header of one file, and reads of single tensors from it."""

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
        self.metadata: dict = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            info = TensorInfo(dtype, tuple(entry["shape"]), data_start + begin, data_start + end)
            numel = 1
            for dim in info.shape:
                numel *= dim
            if info.end > size or info.nbytes != numel * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated or inconsistent with its shape")
            self.tensors[name] = info

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

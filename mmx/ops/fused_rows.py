"""RMSNorm, QK-norm with rotary, and SwiGLU's silu(gate) * up, each one pass over memory (``fused_rows.c``), for
eager float32 forwards on the CPU: prefill chunks, mostly.

As torch ops each is several kernels that read and write the whole activation (RMSNorm: pow, mean, add, rsqrt and two
multiplies; rotary: slices, a negation, two cats, two multiplies and an add). The C kernels live in the library
:mod:`mmx.ops.expert_rows` builds (same cache, same compilers) and are called through ctypes, which lets go of the
GIL. They take contiguous float32 CPU tensors outside autograd and compiled graphs, rows whose lengths are multiples
of 16; anything else, or ``MMX_FUSED_ROWS=0`` (for A/B measurements), keeps the torch ops. The arithmetic is the
native decode step's (rows.h): a row's statistic is summed in a different order than torch's, so results differ from
the torch ops by float32 rounding (a few ulp), and agree with the native decode step.
"""

from __future__ import annotations

import ctypes
import os

import torch

from mmx.ops import expert_rows

ROW_MULTIPLE = 16  # floats per vector in the kernels

_library: ctypes.CDLL | bool | None = None  # None: not loaded yet; False: unavailable here


def enabled() -> bool:
    """``MMX_FUSED_ROWS``: on unless "0"."""
    return os.environ.get("MMX_FUSED_ROWS", "1") != "0"


def _kernels() -> ctypes.CDLL | None:
    global _library
    if _library is None:
        path = expert_rows.library_path() if enabled() else None
        if path is None:
            _library = False
        else:
            lib = ctypes.CDLL(path)
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
            lib.mmx_rms_norm_rows.argtypes = [p, p, p, i64, i32, f32, i32]
            lib.mmx_norm_rotary_rows.argtypes = [p, p, f32, p, p, p, i64, i32, i32, i32, i32]
            lib.mmx_silu_mul_rows.argtypes = [p, p, i64, i32, i32]
            for fn in (lib.mmx_rms_norm_rows, lib.mmx_norm_rotary_rows, lib.mmx_silu_mul_rows):
                fn.restype = None
            _library = lib
    return _library or None


def reset() -> None:
    """Forget whether the kernels are loaded: the next call reads ``MMX_FUSED_ROWS`` again (tests, A/B runs)."""
    global _library
    _library = None


def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these tensors: contiguous float32 on the CPU, not recorded by autograd, outside
    compiled graphs, and the library loaded (None entries are skipped)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or (grad and t.requires_grad):
            return False
    return _kernels() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps); x's last dimension a multiple of ROW_MULTIPLE (after :func:`takes`)."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    _kernels().mmx_rms_norm_rows(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps, torch.get_num_threads()
    )
    return out


def norm_rotary(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor:
    """x [..., heads * head_dim] normalised over its last dimension (when ``weight`` is given), then NeoX rotary on
    the first ``cos.shape[-1]`` channels of each head; cos / sin [..., rotary_dim], one row per row of x."""
    n, rotary_dim = x.shape[-1], cos.shape[-1]
    rows = x.numel() // n
    if cos.numel() != rows * rotary_dim or sin.shape != cos.shape:
        raise ValueError(f"norm_rotary: cos / sin {tuple(cos.shape)} do not give one row per row of x {tuple(x.shape)}")
    out = torch.empty_like(x)
    _kernels().mmx_norm_rotary_rows(
        x.data_ptr(),
        None if weight is None else weight.data_ptr(),
        eps,
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        rows,
        heads,
        n // heads,
        rotary_dim,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2 * inner] (gate then up); inner a multiple of ROW_MULTIPLE."""
    inner = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inner)
    _kernels().mmx_silu_mul_rows(
        gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inner), inner, torch.get_num_threads()
    )
    return out

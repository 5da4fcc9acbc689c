"""One-pass kernels of eager float32 forwards on the CPU (``fused_rows.c``), prefill chunks mostly: RMSNorm, QK-norm
with rotary, SwiGLU's silu(gate) * up, and causal softmax attention.

As torch ops each of the first three is several kernels that read and write the whole activation (RMSNorm: pow,
mean, add, rsqrt and two multiplies; rotary: slices, a negation, two cats, two multiplies and an add). Attention
replaces torch's CPU flash kernel, which on these head sizes ran at 105-130 GFLOP/s (its causal blocks of 256 x 512
compute and then mask the diagonal's hidden half; a chunk after cached keys took two calls and a merge of their
log-sum-exps): here tiles of 6 query rows by 64 keys keep their 24 score vectors in registers through the online
softmax, blocks past a row's position are skipped, any causal offset is one call, and the output is written
[B, T, H, D], as the output projection reads it (bench/fused_rows.py, docs/benchmarks.md).

The kernels live in the library :mod:`mmx.ops.expert_rows` builds (same cache, same compilers) and are called
through ctypes, which lets go of the GIL. They take float32 CPU tensors outside autograd and compiled graphs, rows
whose lengths are multiples of 16; anything else, or ``MMX_FUSED_ROWS=0`` (for A/B measurements), keeps the torch
ops. Each output row is computed by one thread in a fixed order, so results do not depend on the thread count, and a
row's attention does not depend on the other rows of its call: a chunk after cached keys gives the bits of the whole
prompt. The arithmetic is the native decode step's (rows.h): sums are taken in a different order than torch's, so
results differ from the torch ops by float32 rounding.
"""

from __future__ import annotations

import ctypes
import os

import torch

from mmx.ops import expert_rows

ROW_MULTIPLE = 16  # floats per vector in the kernels

_library: ctypes.CDLL | bool | None = None  # None: not loaded yet; False: unavailable here


def enabled() -> bool:
    """``MMX_FUSED_ROWS``: "1" (the default) or "0"; anything else is refused by name."""
    value = os.environ.get("MMX_FUSED_ROWS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MMX_FUSED_ROWS={value!r}: use 1 (the one-pass kernels, the default) or 0 (the torch ops)")
    return value == "1"


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
            lib.mmx_attention_rows.argtypes = [p, p, p, p, p, p, p, i64, i32, i32, i64, i64, i32, i32, i64, f32, i32]
            for name in ("rms_norm_rows", "norm_rotary_rows", "silu_mul_rows"):
                getattr(lib, f"mmx_{name}").restype = None
            lib.mmx_attention_rows.restype = i32  # non-zero: a thread's work buffer could not be allocated
            _library = lib
    return _library or None


def reset() -> None:
    """Forget whether the kernels are loaded: the next call reads ``MMX_FUSED_ROWS`` again (tests, A/B runs)."""
    global _library
    _library = None


def takes(*tensors: torch.Tensor | None, contiguous: bool = True) -> bool:
    """Whether the kernels take these tensors: float32 on the CPU (and contiguous, unless the kernel reads strides),
    not recorded by autograd, outside compiled graphs, and the library loaded (None entries are skipped)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
        if contiguous and not t.is_contiguous():
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
    if n % heads or rotary_dim % 2 or rotary_dim > n // heads:
        raise ValueError(f"norm_rotary: rows of {n} in {heads} heads, rotary on {rotary_dim} channels, refused")
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


def takes_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` takes these: :func:`takes` them (any strides but the channels'), a head size that
    is a multiple of ROW_MULTIPLE, K and V of one shape, query heads a multiple of K/V heads."""
    return _readable(q, k, v) and takes(q, k, v, contiguous=False)


def _readable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and strides the attention kernel reads: 4-D, one batch and head size (a multiple of ROW_MULTIPLE), K
    and V of one shape, query heads a multiple of K/V heads, channels contiguous."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]):
        return False
    return q.shape[3] % ROW_MULTIPLE == 0 and q.shape[1] % k.shape[1] == 0 and all(x.stride(-1) == 1 for x in (q, k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int | None) -> torch.Tensor:
    """softmax(scale q k^T) v for q [B, H, T, D] and k / v [B, G, S, D] (G dividing H; channels contiguous, any other
    strides), query i seeing keys j <= offset + i (``offset`` None: every key). Returns [B, H, T, D], a view of
    [B, T, H, D] storage (what the output projection reads, without a copy). D a multiple of ROW_MULTIPLE."""
    if not _readable(q, k, v):
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} refused")
    b, h, t, d = q.shape
    g, s = k.shape[1], k.shape[2]
    out = q.new_empty(b, t, h, d)

    def strides(x: torch.Tensor):
        return (ctypes.c_int64 * 3)(*x.stride()[:3])

    failed = _kernels().mmx_attention_rows(
        q.data_ptr(),
        strides(q),
        k.data_ptr(),
        strides(k),
        v.data_ptr(),
        strides(v),
        out.data_ptr(),
        b,
        h,
        g,
        t,
        s,
        d,
        offset is not None,
        offset or 0,
        scale,
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"attention: no memory for the kernel's work buffers (head size {d})")
    return out.transpose(1, 2)

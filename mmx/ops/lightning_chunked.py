"""Chunked lightning attention in plain PyTorch: the fast path on CPU (and the fallback on any device), with a
backward pass of its own.

Layout is token-major, q, k [B, T, H, Dk] and v [B, T, H, Dv], exactly what a qkv projection produces, so the layer
needs no transposes. For a chunk of m tokens (positions r, c in [0, m)), lambda = exp(-s) per head:

    O     = qdec * (Q S) + ((Q K^T) * diag) V            qdec[r] = lambda^(r+1),  diag[r,c] = lambda^(r-c) [r>=c]
    S_new = lambda^m S + K^T (kdec * V)                  kdec[c] = lambda^(m-1-c)

Row scalings are applied to contiguous matmul results rather than to strided inputs (strided elementwise ops are
slow on CPU). The state is float32 whatever the input dtype; with bf16 inputs the matmuls run in bf16 (AMX) with
the state rounded to bf16 only as a matmul operand.

Backward recomputes instead of storing per-chunk states (memory stays O(T * D)): one pass forward in time for dQ
(which needs the state entering each chunk), one pass backward in time for dK, dV and the initial state (which
need the gradient flowing into each chunk's final state G):

    dQ = (M K) + qdec * (dO S_in^T)                     M = (dO V^T) * diag
    dK = M^T Q + kdec * (V G^T)
    dV = A^T dO + kdec * (K G)                          A = (Q K^T) * diag
    G_in = lambda^m G + Q^T (qdec * dO)
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from mmx.ops.lightning_ref import check_shapes

# exp(x) for x < -60 is below 1e-26: flushed to exactly zero, because fp32 subnormals (e^-87 .. e^-103) take a
# slow path on x86 CPUs and made the chunk loop 2-2.5x slower in measurements.
_UNDERFLOW = -60.0


def default_chunk_size(num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Chunk length by work per chunk (heads x head width), measured on a 2-core AVX-512/AMX Xeon (bench/lightning.py).

    Longer chunks amortise the per-chunk op overhead; the intra-chunk work grows with the chunk length, and takes
    over sooner in float32 than with bf16 / fp16 matmuls on AMX."""
    width = num_heads * head_dim
    if dtype in (torch.bfloat16, torch.float16):
        return 256 if width <= 2048 else 128
    if width <= 256:
        return 256
    return 128 if width <= 1024 else 64


@lru_cache(maxsize=512)
def _tables_cached(rates_key: tuple[float, ...], chunk: int, device: str, dtype: torch.dtype):
    s = torch.tensor(rates_key, dtype=torch.float64)[:, None]  # [H, 1]
    pos = torch.arange(chunk, dtype=torch.float64)

    def exp_flushed(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < _UNDERFLOW, torch.zeros((), dtype=torch.float64), torch.exp(x))

    qdec = exp_flushed(-s * (pos + 1))[..., None]  # [H, C, 1]
    kdec = exp_flushed(-s * (chunk - 1 - pos))[..., None]  # [H, C, 1]
    lag = pos[:, None] - pos[None, :]
    diag = torch.where(lag >= 0, exp_flushed(-s[..., None] * lag.clamp(min=0)), torch.zeros((), dtype=torch.float64))
    return (
        qdec.to(device=device, dtype=dtype),
        kdec.to(device=device, dtype=dtype),
        diag.to(device=device, dtype=dtype),
    )


class _Tables:
    """Decay tables of one (rates, chunk size, dtype); ragged chunks slice them."""

    def __init__(self, rates: torch.Tensor, chunk: int, dtype: torch.dtype):
        self.chunk = chunk
        self.rates = rates.detach().to(_state_dtype(dtype))
        key = tuple(float(r) for r in self.rates.cpu().tolist())
        self.qdec, self.kdec, self.diag = _tables_cached(key, chunk, str(rates.device), dtype)
        self.block = self._block(chunk)

    def _block(self, m: int) -> torch.Tensor:
        exponent = -self.rates * m
        return torch.where(exponent < _UNDERFLOW, torch.zeros_like(exponent), torch.exp(exponent))[:, None, None]

    def for_length(self, m: int):
        """(qdec, kdec, diag, block decay lambda^m as float32 [H, 1, 1]) for a chunk of m tokens."""
        if m == self.chunk:
            return self.qdec, self.kdec, self.diag, self.block
        return self.qdec[:, :m], self.kdec[:, self.chunk - m :], self.diag[:, :m, :m], self._block(m)


def _chunk(x: torch.Tensor, b: int, start: int, m: int) -> torch.Tensor:
    """[H, m, D] contiguous copy (always a copy: callers scale it in place) of tokens start..start+m of row b."""
    return x[b, start : start + m].transpose(0, 1).clone(memory_format=torch.contiguous_format)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state accumulates in float32, or float64 for float64 inputs (gradcheck, oracles)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def _forward(q, k, v, rates, initial_state, chunk):
    b_size, t, h, dk = q.shape
    dv = v.shape[-1]
    dtype, acc = q.dtype, _state_dtype(q.dtype)
    tables = _Tables(rates, chunk, dtype)
    out = torch.empty(b_size, t, h, dv, dtype=dtype, device=q.device)
    finals = []
    for b in range(b_size):
        state = (
            torch.zeros(h, dk, dv, dtype=acc, device=q.device)
            if initial_state is None
            else initial_state[b].to(acc, copy=True)
        )
        for start in range(0, t, chunk):
            m = min(chunk, t - start)
            qdec, kdec, diag, block = tables.for_length(m)
            qc, kc, vc = _chunk(q, b, start, m), _chunk(k, b, start, m), _chunk(v, b, start, m)
            scores = torch.bmm(qc, kc.transpose(1, 2)).mul_(diag)
            o = torch.bmm(qc, state.to(dtype)).mul_(qdec)
            o.baddbmm_(scores, vc)
            out[b, start : start + m] = o.transpose(0, 1)
            state.mul_(block).add_(torch.bmm(kc.transpose(1, 2), vc.mul_(kdec)))
        finals.append(state)
    return out, torch.stack(finals)


@torch.no_grad()
def _backward(q, k, v, rates, initial_state, grad_out, grad_final, chunk, need_state_grad):
    b_size, t, h, dk = q.shape
    dv = v.shape[-1]
    dtype, acc = q.dtype, _state_dtype(q.dtype)
    tables = _Tables(rates, chunk, dtype)
    dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_init = []
    starts = list(range(0, t, chunk))
    for b in range(b_size):
        # Pass 1, forward in time: dQ needs the state entering each chunk.
        state = (
            torch.zeros(h, dk, dv, dtype=acc, device=q.device)
            if initial_state is None
            else initial_state[b].to(acc, copy=True)
        )
        for start in starts:
            m = min(chunk, t - start)
            qdec, kdec, diag, block = tables.for_length(m)
            kc, vc, gc = _chunk(k, b, start, m), _chunk(v, b, start, m), _chunk(grad_out, b, start, m)
            mixed = torch.bmm(gc, vc.transpose(1, 2)).mul_(diag)  # M = (dO V^T) * diag
            g_q = torch.bmm(gc, state.to(dtype).transpose(1, 2)).mul_(qdec)
            g_q.baddbmm_(mixed, kc)
            dq[b, start : start + m] = g_q.transpose(0, 1)
            state.mul_(block).add_(torch.bmm(kc.transpose(1, 2), vc.mul_(kdec)))
        # Pass 2, backward in time: G is the gradient reaching the state at the end of the chunk.
        grad_state = (
            torch.zeros(h, dk, dv, dtype=acc, device=q.device)
            if grad_final is None
            else grad_final[b].to(acc, copy=True)
        )
        for start in reversed(starts):
            m = min(chunk, t - start)
            qdec, kdec, diag, block = tables.for_length(m)
            qc, kc, vc = _chunk(q, b, start, m), _chunk(k, b, start, m), _chunk(v, b, start, m)
            gc = _chunk(grad_out, b, start, m)
            g_state = grad_state.to(dtype)
            mixed = torch.bmm(gc, vc.transpose(1, 2)).mul_(diag)
            scores = torch.bmm(qc, kc.transpose(1, 2)).mul_(diag)
            g_k = torch.bmm(vc, g_state.transpose(1, 2)).mul_(kdec)
            g_k.baddbmm_(mixed.transpose(1, 2), qc)
            g_v = torch.bmm(kc, g_state).mul_(kdec)
            g_v.baddbmm_(scores.transpose(1, 2), gc)
            dk_[b, start : start + m] = g_k.transpose(0, 1)
            dv_[b, start : start + m] = g_v.transpose(0, 1)
            grad_state.mul_(block).add_(torch.bmm(qc.transpose(1, 2), gc.mul_(qdec)))
        d_init.append(grad_state)
    return dq, dk_, dv_, (torch.stack(d_init) if need_state_grad else None)


class _LightningChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rates, initial_state, chunk):
        out, final = _forward(q, k, v, rates, initial_state, chunk)
        ctx.save_for_backward(q, k, v, rates, initial_state)
        ctx.chunk = chunk
        ctx.has_initial = initial_state is not None
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, rates, initial_state = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(v)
        need_state_grad = ctx.has_initial and ctx.needs_input_grad[4]
        dq, dk, dv, d_init = _backward(
            q, k, v, rates, initial_state, grad_out.contiguous(), grad_final, ctx.chunk, need_state_grad
        )
        return dq, dk, dv, None, d_init, None


def lightning_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention over token-major q, k [B, T, H, Dk], v [B, T, H, Dv] with decay rates [H].

    Returns (output [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32). Differentiable in q, k, v and
    the initial state through a chunked backward pass (the decay rates are constants)."""
    check_shapes(q, k, v, rates)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    chunk = chunk_size or default_chunk_size(q.shape[2], max(q.shape[-1], v.shape[-1]), q.dtype)
    if q.shape[1] == 0:
        b, _, h, dk = q.shape
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float32, device=q.device)
        return v.new_zeros(v.shape), state if initial_state is None else initial_state.float()
    return _LightningChunked.apply(q, k, v, rates, initial_state, chunk)


def lightning_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One decode step for N sequences, updating ``state`` [N, H, Dk, Dv] (float32) in place.

    q, k [N, H, Dk], v [N, H, Dv] -> output [N, H, Dv] in q's dtype: S = lambda S + k^T v, then o = q S."""
    n, h, dk = q.shape
    dv = v.shape[-1]
    flat = state.view(n * h, dk, dv)
    decay = torch.exp(-rates.float()).repeat(n)[:, None, None]
    flat.mul_(decay).baddbmm_(k.reshape(n * h, dk, 1).float(), v.reshape(n * h, 1, dv).float())
    return torch.bmm(q.reshape(n * h, 1, dk).float(), flat).view(n, h, dv).to(q.dtype)


def flops(t: int, h: int, dk: int, dv: int, chunk: int) -> float:
    """Multiply-adds x 2 of the chunked forward (the causal intra-chunk half counted in full, as computed)."""
    chunks = math.ceil(t / chunk)
    per_chunk = 2 * h * (chunk * chunk * dk + chunk * chunk * dv + 2 * chunk * dk * dv)
    return chunks * per_chunk

"""Lightning attention in Triton: chunked forward, two-pass backward, and a pooled decode step.

Each program owns one (sequence, head, block of value channels) and walks its sequence's chunks in order with the
float32 state block [Dk, BV] held on chip, as in Lightning Attention-2; sequences are read from ``cu_seqlens`` so
packed batches need no padding. The backward pass recomputes instead of storing per-chunk states: a forward sweep
for dQ, a reverse sweep for dK, dV and the initial state (the same equations as mmx.ops.lightning_chunked).

Per program the value channels are split in blocks of BV; dQ and dK sum their per-block partials afterwards.
On machines without a GPU the kernels run (slowly) under ``TRITON_INTERPRET=1``, which the tests use.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the CPU install has no triton; mmx.ops.lightning falls back to the chunked torch path
    AVAILABLE = False

CHUNK = 64


def _block_sizes(dk: int, dv: int) -> tuple[int, int]:
    bk = max(16, triton.next_power_of_2(dk))
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    return bk, bv


if AVAILABLE:

    @triton.jit
    def _tile(base, rows, cols, s_t, s_h, i_h, row_mask, col_mask):
        """Pointers and mask of a [rows, cols] tile of head i_h in a token-major [tokens, heads, channels] tensor."""
        return base + rows[:, None] * s_t + i_h * s_h + cols[None, :], row_mask[:, None] & col_mask[None, :]

    @triton.jit
    def _decays(s, offs_t, m, valid):
        """q_dec[r] = exp(-s (r+1)), k_dec[c] = exp(-s (m-1-c)) (0 past the chunk end), diag[r, c] = exp(-s (r-c))
        for r >= c, else 0. Every exponent is <= 0."""
        pos = offs_t.to(tl.float32)
        q_dec = tl.exp(-s * (pos + 1.0))
        k_dec = tl.where(valid, tl.exp(-s * (m - 1.0 - pos)), 0.0)
        lag = pos[:, None] - pos[None, :]
        diag = tl.where(lag >= 0, tl.exp(-s * tl.maximum(lag, 0.0)), 0.0)
        return q_dec, k_dec, diag

    @triton.jit
    def _fwd_kernel(
        q,
        k,
        v,
        o,
        rates,
        h0,
        ht,
        cu,
        s_qt,
        s_qh,
        s_vt,
        s_vh,
        s_ot,
        s_oh,
        H: tl.constexpr,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        BT: tl.constexpr,
        USE_H0: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_v, i_nh = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        s = tl.load(rates + i_h).to(tl.float32)
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mk, mv = offs_k < DK, offs_v < DV
        state_ptr = offs_k[:, None] * DV + offs_v[None, :]
        state_mask = mk[:, None] & mv[None, :]
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            b_h = tl.load(h0 + i_nh * DK * DV + state_ptr, mask=state_mask, other=0.0).to(tl.float32)
        for t0 in range(bos, eos, BT):
            rows = t0 + offs_t
            mt = rows < eos
            m = tl.minimum(eos - t0, BT).to(tl.float32)
            b_q = tl.load(*_tile(q, rows, offs_k, s_qt, s_qh, i_h, mt, mk), other=0.0)
            b_k = tl.load(*_tile(k, rows, offs_k, s_qt, s_qh, i_h, mt, mk), other=0.0)
            b_v = tl.load(*_tile(v, rows, offs_v, s_vt, s_vh, i_h, mt, mv), other=0.0)
            q_dec, k_dec, diag = _decays(s, offs_t, m, mt)
            b_a = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * diag
            b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PRECISION) * q_dec[:, None]
            b_o += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION)
            o_ptr, o_mask = _tile(o, rows, offs_v, s_ot, s_oh, i_h, mt, mv)
            tl.store(o_ptr, b_o.to(o.dtype.element_ty), mask=o_mask)
            b_kv = (b_v * k_dec[:, None]).to(b_k.dtype)
            b_h = b_h * tl.exp(-s * m) + tl.dot(tl.trans(b_k), b_kv, input_precision=PRECISION)
        tl.store(ht + i_nh * DK * DV + state_ptr, b_h, mask=state_mask)

    @triton.jit
    def _bwd_dq_kernel(
        k,
        v,
        do,
        dq,
        rates,
        h0,
        cu,
        s_qt,
        s_qh,
        s_vt,
        s_vh,
        s_dqv,
        s_dqt,
        s_dqh,
        H: tl.constexpr,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        BT: tl.constexpr,
        USE_H0: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Forward sweep: dQ = ((dO V^T) * diag) K + q_dec * (dO S_in^T), one partial per value block."""
        i_v, i_nh = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        s = tl.load(rates + i_h).to(tl.float32)
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mk, mv = offs_k < DK, offs_v < DV
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            b_h = tl.load(
                h0 + i_nh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0
            ).to(tl.float32)
        for t0 in range(bos, eos, BT):
            rows = t0 + offs_t
            mt = rows < eos
            m = tl.minimum(eos - t0, BT).to(tl.float32)
            b_k = tl.load(*_tile(k, rows, offs_k, s_qt, s_qh, i_h, mt, mk), other=0.0)
            b_v = tl.load(*_tile(v, rows, offs_v, s_vt, s_vh, i_h, mt, mv), other=0.0)
            b_do = tl.load(*_tile(do, rows, offs_v, s_vt, s_vh, i_h, mt, mv), other=0.0)
            q_dec, k_dec, diag = _decays(s, offs_t, m, mt)
            b_m = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION) * diag
            b_dq = tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)), input_precision=PRECISION) * q_dec[:, None]
            b_dq += tl.dot(b_m.to(b_k.dtype), b_k, input_precision=PRECISION)
            dq_ptr, dq_mask = _tile(dq + i_v * s_dqv, rows, offs_k, s_dqt, s_dqh, i_h, mt, mk)
            tl.store(dq_ptr, b_dq, mask=dq_mask)
            b_kv = (b_v * k_dec[:, None]).to(b_k.dtype)
            b_h = b_h * tl.exp(-s * m) + tl.dot(tl.trans(b_k), b_kv, input_precision=PRECISION)

    @triton.jit
    def _bwd_dkv_kernel(
        q,
        k,
        v,
        do,
        dk,
        dv,
        rates,
        dht,
        dh0,
        cu,
        s_qt,
        s_qh,
        s_vt,
        s_vh,
        s_dkv,
        s_dkt,
        s_dkh,
        H: tl.constexpr,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        BT: tl.constexpr,
        USE_DHT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Reverse sweep with G, the gradient reaching the state at the end of the chunk:
        dK = ((dO V^T) * diag)^T Q + k_dec * (V G^T) (partial per value block), dV = A^T dO + k_dec * (K G),
        G <- lambda^m G + Q^T (q_dec * dO); what is left in G is the initial state's gradient."""
        i_v, i_nh = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        s = tl.load(rates + i_h).to(tl.float32)
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mk, mv = offs_k < DK, offs_v < DV
        state_ptr = offs_k[:, None] * DV + offs_v[None, :]
        state_mask = mk[:, None] & mv[None, :]
        b_g = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_DHT:
            b_g = tl.load(dht + i_nh * DK * DV + state_ptr, mask=state_mask, other=0.0).to(tl.float32)
        n_chunks = tl.cdiv(eos - bos, BT)
        for i in range(n_chunks):
            t0 = bos + (n_chunks - 1 - i) * BT
            rows = t0 + offs_t
            mt = rows < eos
            m = tl.minimum(eos - t0, BT).to(tl.float32)
            b_q = tl.load(*_tile(q, rows, offs_k, s_qt, s_qh, i_h, mt, mk), other=0.0)
            b_k = tl.load(*_tile(k, rows, offs_k, s_qt, s_qh, i_h, mt, mk), other=0.0)
            b_v = tl.load(*_tile(v, rows, offs_v, s_vt, s_vh, i_h, mt, mv), other=0.0)
            b_do = tl.load(*_tile(do, rows, offs_v, s_vt, s_vh, i_h, mt, mv), other=0.0)
            q_dec, k_dec, diag = _decays(s, offs_t, m, mt)
            b_gc = b_g.to(b_q.dtype)
            b_m = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION) * diag
            b_a = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * diag
            b_dk = tl.dot(b_v, tl.trans(b_gc), input_precision=PRECISION) * k_dec[:, None]
            b_dk += tl.dot(tl.trans(b_m).to(b_q.dtype), b_q, input_precision=PRECISION)
            b_dv = tl.dot(b_k, b_gc, input_precision=PRECISION) * k_dec[:, None]
            b_dv += tl.dot(tl.trans(b_a).to(b_do.dtype), b_do, input_precision=PRECISION)
            dk_ptr, dk_mask = _tile(dk + i_v * s_dkv, rows, offs_k, s_dkt, s_dkh, i_h, mt, mk)
            tl.store(dk_ptr, b_dk, mask=dk_mask)
            dv_ptr, dv_mask = _tile(dv, rows, offs_v, s_vt, s_vh, i_h, mt, mv)
            tl.store(dv_ptr, b_dv.to(dv.dtype.element_ty), mask=dv_mask)
            b_qdo = (b_do * q_dec[:, None]).to(b_q.dtype)
            b_g = b_g * tl.exp(-s * m) + tl.dot(tl.trans(b_q), b_qdo, input_precision=PRECISION)
        tl.store(dh0 + i_nh * DK * DV + state_ptr, b_g, mask=state_mask)

    @triton.jit
    def _decode_kernel(
        q,
        k,
        v,
        o,
        rates,
        pool,
        slots,
        s_qn,
        s_qh,
        s_vn,
        s_vh,
        s_on,
        s_oh,
        H: tl.constexpr,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
    ):
        """S <- lambda S + k^T v; o = q S for one token of sequence n, head h, value block i_v (in place)."""
        i_v, i_nh = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        slot = tl.load(slots + i_n).to(tl.int64)
        s = tl.load(rates + i_h).to(tl.float32)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mk, mv = offs_k < DK, offs_v < DV
        ptr = pool + (slot * H + i_h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        b_h = tl.load(ptr, mask=mk[:, None] & mv[None, :], other=0.0)
        b_q = tl.load(q + i_n * s_qn + i_h * s_qh + offs_k, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(k + i_n * s_qn + i_h * s_qh + offs_k, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_n * s_vn + i_h * s_vh + offs_v, mask=mv, other=0.0).to(tl.float32)
        b_h = b_h * tl.exp(-s) + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_q[:, None] * b_h, axis=0)
        tl.store(ptr, b_h, mask=mk[:, None] & mv[None, :])
        tl.store(o + i_n * s_on + i_h * s_oh + offs_v, b_o.to(o.dtype.element_ty), mask=mv)


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B*T, H, D] with unit channel stride (a view when the layout allows)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
        x = x.contiguous()
    return x.reshape(-1, x.shape[2], x.shape[3])


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (not tf32): lightning states sum thousands of terms.
    return "ieee" if dtype == torch.float32 else "tf32"


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rates, initial_state, cu_seqlens):
        n = cu_seqlens.numel() - 1
        qf, kf, vf = _as_tokens(q), _as_tokens(k), _as_tokens(v)
        if kf.stride() != qf.stride():  # the kernels index q and k with the same strides
            qf, kf = qf.contiguous(), kf.contiguous()
        _, h, dk = qf.shape
        dv = vf.shape[-1]
        bk, bv = _block_sizes(dk, dv)
        out = torch.empty(qf.shape[0], h, dv, dtype=q.dtype, device=q.device)
        final = torch.empty(n, h, dk, dv, dtype=torch.float32, device=q.device)
        h0 = initial_state.float().contiguous() if initial_state is not None else final
        rates = rates.float().contiguous()
        grid = (triton.cdiv(dv, bv), n * h)
        _fwd_kernel[grid](
            qf,
            kf,
            vf,
            out,
            rates,
            h0,
            final,
            cu_seqlens,
            qf.stride(0),
            qf.stride(1),
            vf.stride(0),
            vf.stride(1),
            out.stride(0),
            out.stride(1),
            H=h,
            DK=dk,
            DV=dv,
            BK=bk,
            BV=bv,
            BT=CHUNK,
            USE_H0=initial_state is not None,
            PRECISION=_precision(q.dtype),
        )
        ctx.save_for_backward(qf, kf, vf, rates, h0 if initial_state is not None else None, cu_seqlens)
        ctx.shape = (q.shape, v.shape)
        return out.view(*q.shape[:3], dv), final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        qf, kf, vf, rates, h0, cu = ctx.saved_tensors
        q_shape, v_shape = ctx.shape
        n = cu.numel() - 1
        _, h, dk = qf.shape
        dv = vf.shape[-1]
        bk, bv = _block_sizes(dk, dv)
        nv = triton.cdiv(dv, bv)
        if grad_out is None:
            grad_out = torch.zeros(v_shape, dtype=vf.dtype, device=vf.device)
        # v, dO and dV share one (contiguous) layout; the kernels index all three with the same strides.
        do = grad_out.reshape(-1, h, dv).contiguous()
        vf = vf.contiguous()
        dq_parts = torch.empty(nv, qf.shape[0], h, dk, dtype=torch.float32, device=qf.device)
        dk_parts = torch.empty_like(dq_parts)
        dv_ = torch.empty_like(vf)
        dh0 = torch.empty(n, h, dk, dv, dtype=torch.float32, device=qf.device)
        dht = grad_final.float().contiguous() if grad_final is not None else dh0
        common = dict(H=h, DK=dk, DV=dv, BK=bk, BV=bv, BT=CHUNK, PRECISION=_precision(qf.dtype))
        _bwd_dq_kernel[(nv, n * h)](
            kf,
            vf,
            do,
            dq_parts,
            rates,
            h0 if h0 is not None else dh0,
            cu,
            kf.stride(0),
            kf.stride(1),
            vf.stride(0),
            vf.stride(1),
            dq_parts.stride(0),
            dq_parts.stride(1),
            dq_parts.stride(2),
            USE_H0=h0 is not None,
            **common,
        )
        _bwd_dkv_kernel[(nv, n * h)](
            qf,
            kf,
            vf,
            do,
            dk_parts,
            dv_,
            rates,
            dht,
            dh0,
            cu,
            qf.stride(0),
            qf.stride(1),
            vf.stride(0),
            vf.stride(1),
            dk_parts.stride(0),
            dk_parts.stride(1),
            dk_parts.stride(2),
            USE_DHT=grad_final is not None,
            **common,
        )
        dq = dq_parts.sum(0).to(qf.dtype).view(q_shape)
        dk_ = dk_parts.sum(0).to(kf.dtype).view(q_shape)
        return dq, dk_, dv_.reshape(v_shape), None, (dh0 if h0 is not None else None), None


def lightning_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton lightning attention over token-major [B, T, H, D]; ``cu_seqlens`` packs sequences along T (B = 1).
    Returns (output, float32 final states [B or N, H, Dk, Dv]). ``chunk_size`` is fixed at 64 here."""
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    b, t = q.shape[:2]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
    return _LightningTriton.apply(q, k, v, rates, initial_state, cu_seqlens.to(device=q.device, dtype=torch.int32))


def lightning_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per sequence (q, k [N, H, Dk], v [N, H, Dv]) against a float32 state pool, in place."""
    n, h, dk = q.shape
    dv = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("the lightning state pool must be a contiguous float32 tensor (rows may be a slice of one)")
    if slots is None:
        slots = torch.arange(n, device=q.device)
    bk, bv = _block_sizes(dk, dv)
    out = torch.empty(n, h, dv, dtype=q.dtype, device=q.device)
    _decode_kernel[(triton.cdiv(dv, bv), n * h)](
        q,
        k,
        v,
        out,
        rates.float().contiguous(),
        state,
        slots.to(torch.int64),
        q.stride(0),
        q.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        H=h,
        DK=dk,
        DV=dv,
        BK=bk,
        BV=bv,
    )
    return out

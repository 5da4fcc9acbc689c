"""Reference lightning attention: the exact definition in three forms, the oracles the fast kernels are held to.

For one head with decay rate s (lambda = exp(-s)) and state S (d_k x d_v):

    S_t = lambda * S_{t-1} + k_t^T v_t          o_t = q_t S_t       (token t sees itself)

Layout (as everywhere in mmx.ops): token-major q, k [B, T, H, Dk], v [B, T, H, Dv]; rates [H]; state
[B, H, Dk, Dv], float32 whatever the input dtype. Outputs come back in the input dtype.
"""

from __future__ import annotations

import torch


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B,T,H,Dk] and v [B,T,H,Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if rates.shape != (q.shape[2],):
        raise ValueError(f"expected {q.shape[2]} decay rates, got shape {tuple(rates.shape)}")


def _zero_state(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, _, h, dk = q.shape
    return torch.zeros(b, h, dk, v.shape[-1], dtype=dtype, device=q.device)


def lightning_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic float64 form: o_t = q_t (lambda^(t+1) S_0 + sum_{u<=t} lambda^(t-u) k_u^T v_u).

    Returns float64 (output [B, T, H, Dv], final state). Only for tests: memory is O(T^2)."""
    check_shapes(q, k, v, rates)
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    s = rates.double().to(q.device)[:, None, None]
    t = torch.arange(q.shape[2], device=q.device, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    decay = torch.where(lag >= 0, torch.exp(-s * lag.clamp(min=0)), torch.zeros((), dtype=torch.float64))
    out = ((q @ k.transpose(-1, -2)) * decay) @ v
    to_end = torch.exp(-s * (t.numel() - 1 - t)[:, None])  # [H, T, 1]: lambda^(T-1-u)
    final = (k * to_end).transpose(-1, -2) @ v
    if initial_state is not None:
        s0 = initial_state.double()
        out = out + (q * torch.exp(-s * (t + 1)[:, None])) @ s0
        final = final + torch.exp(-s * t.numel()) * s0
    return out.transpose(1, 2), final


def lightning_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence with a float32 state (what decode computes)."""
    check_shapes(q, k, v, rates)
    state = _zero_state(q, v, torch.float32) if initial_state is None else initial_state.float().clone()
    lam = torch.exp(-rates.float().to(q.device))[None, :, None, None]
    outs = []
    for t in range(q.shape[1]):
        kt, vt = k[:, t].float(), v[:, t].float()
        state = lam * state + kt[..., :, None] * vt[..., None, :]
        outs.append((q[:, t].float()[..., None, :] @ state).squeeze(-2))
    out = torch.stack(outs, dim=1) if outs else q.new_zeros(*q.shape[:3], v.shape[-1]).float()
    return out.to(q.dtype), state


def lightning_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    block_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning Attention-2 block form, float32 throughout, written plainly. For a block of m tokens (positions
    r, c in [0, m)):

        O     = (Q * lambda^(r+1)) S + ((Q K^T) * lambda^(r-c) [r >= c]) V
        S_new = lambda^m S + (K * lambda^(m-1-c))^T V

    Every exponent is <= 0; the upper triangle is zero by construction, never exp of a positive number.
    Differentiable through plain autograd."""
    check_shapes(q, k, v, rates)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    state = _zero_state(q, v, torch.float32) if initial_state is None else initial_state.float()
    s = rates.float().to(q.device)[:, None, None]  # [H, 1, 1]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    outs = []
    for start in range(0, q.shape[1], block_size):
        qb = qh[:, :, start : start + block_size].float()
        kb = kh[:, :, start : start + block_size].float()
        vb = vh[:, :, start : start + block_size].float()
        m = qb.shape[2]
        pos = torch.arange(m, device=q.device, dtype=torch.float32)
        q_decay = torch.exp(-s * (pos + 1)[:, None])  # [H, m, 1]
        k_decay = torch.exp(-s * (m - 1 - pos)[:, None])  # [H, m, 1]
        lag = pos[:, None] - pos[None, :]
        diag = torch.where(lag >= 0, torch.exp(-s * lag.clamp(min=0)), torch.zeros((), device=q.device))
        outs.append((qb * q_decay) @ state + ((qb @ kb.transpose(-1, -2)) * diag) @ vb)
        state = torch.exp(-s * m)[None] * state + (kb * k_decay).transpose(-1, -2) @ vb
    out = torch.cat(outs, dim=2) if outs else qh.new_zeros(*qh.shape[:3], v.shape[-1]).float()
    return out.transpose(1, 2).to(q.dtype), state

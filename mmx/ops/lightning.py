"""Dispatch for lightning attention: picks the form that suits the call."""

from __future__ import annotations

import torch

from mmx.ops.lightning_ref import lightning_blocked, lightning_recurrent


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    block_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention over [B, H, T, D] inputs; returns (output in q's dtype, float32 final state)."""
    if q.shape[2] == 1 and initial_state is not None:
        return lightning_recurrent(q, k, v, rates, initial_state)
    return lightning_blocked(q, k, v, rates, initial_state, block_size)

"""How attention layers reach their cache.

A layer never stores state itself. It hands q, k, v to an :class:`AttentionCache`, which knows where earlier
tokens live and how sequences are laid out: :class:`DenseCache` (contiguous tensors, for plain generation) here,
the engine's paged KV blocks and lightning-state slots later. ``cache=None`` means one causal pass over
independent rows with no state kept.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mmx.ops import lightning_attention, lightning_decode


class AttentionCache(Protocol):
    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Default position ids [batch, seq_len] of the tokens about to be processed."""
        ...

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [B, H, T, D], new k / v [B, G, T, D] -> attention output [B, H, T, D] over past and new keys."""
        ...

    def lightning_attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rates: torch.Tensor,
    ) -> torch.Tensor:
        """Token-major q, k, v [B, T, H, D] -> output [B, T, H, D], continuing and updating the layer's state."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after every layer has run."""
        ...


def causal_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int = 0) -> torch.Tensor:
    """GQA softmax attention where query i sits at absolute position q_offset + i and keys start at 0."""
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == 1:  # a single new token sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if q_offset == 0 and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    rows = torch.arange(t, device=q.device)[:, None] + q_offset
    mask = torch.arange(s, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class DenseCache:
    """Contiguous cache for generation outside the engine: all rows share one length. Softmax layers keep K / V
    [B, G, T, D] (keys after RoPE); lightning layers keep a float32 state [B, H, Dk, Dv]."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.states: dict[int, torch.Tensor] = {}
        self.length = 0

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + seq_len, device=device).expand(batch, seq_len)

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if layer_idx in self.kv:
            past_k, past_v = self.kv[layer_idx]
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.kv[layer_idx] = (k, v)
        return causal_softmax(q, k, v, scale, q_offset=self.length)

    def lightning_attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rates: torch.Tensor,
    ) -> torch.Tensor:
        state = self.states.get(layer_idx)
        if q.shape[1] == 1 and state is not None and not torch.is_grad_enabled():
            return lightning_decode(q[:, 0], k[:, 0], v[:, 0], rates, state)[:, None]  # updates state in place
        out, self.states[layer_idx] = lightning_attention(q, k, v, rates, state)
        return out

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

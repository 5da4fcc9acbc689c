"""Softmax (full) attention: GQA with partial RoPE, and M2's QK-norm over all heads at once."""

from __future__ import annotations

import torch
from torch import nn

from mmx.config import MiniMaxConfig
from mmx.model.cache import AttentionCache, causal_softmax
from mmx.model.linear import Linear
from mmx.model.norm import RMSNorm
from mmx.model.rotary import apply_rotary
from mmx.ops import fused_rows


def _norm_args(norm: RMSNorm | None) -> tuple[torch.Tensor | None, float]:
    return (None, 0.0) if norm is None else (norm.weight, norm.eps)


class SoftmaxAttention(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.use_qk_norm:
            # "per_layer": one RMS statistic over the concatenation of all heads, not one per head.
            self.q_norm = RMSNorm(self.num_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _norm_rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """QK-norm and rotary on q [B, T, H * D] and k, one pass each (mmx.ops.fused_rows) where the kernels take
        them: (q, k, whether they are rotated). Plain RMSNorms run inside the rotary kernel; a sharded one (tensor
        parallel: its statistic is summed across ranks) runs its own forward first."""
        plain = type(self.q_norm) is RMSNorm and type(self.k_norm) is RMSNorm
        plain = plain and (q.shape[-1] | k.shape[-1]) % fused_rows.ROW_MULTIPLE == 0
        inside = (self.q_norm, self.k_norm) if plain else (None, None)
        weights = [n.weight for n in inside if n is not None]
        if cos.shape[-1] % 2 == 0 and fused_rows.takes(q, k, cos, sin, *weights):
            if self.q_norm is not None and not plain:
                q, k = self.q_norm(q), self.k_norm(k)
            q = fused_rows.norm_rotary(q, *_norm_args(inside[0]), cos, sin, self.num_heads)
            k = fused_rows.norm_rotary(k, *_norm_args(inside[1]), cos, sin, self.num_kv_heads)
            return q, k, True
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, False

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: AttentionCache | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        cos, sin = rope
        q, k, rotated = self._norm_rotary(q, k, cos, sin)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if not rotated:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = causal_softmax(q, k, v, self.scale)
        else:
            out = cache.softmax_attention(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

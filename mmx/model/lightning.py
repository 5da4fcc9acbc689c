"""The lightning attention layer of M1 / Text-01: projections, gate and norm around the lightning op."""

from __future__ import annotations

import torch
from torch import nn

from mmx.config import MiniMaxConfig
from mmx.model.activation import activation
from mmx.model.cache import AttentionCache
from mmx.model.linear import Linear
from mmx.model.norm import RMSNorm
from mmx.ops import decay_rates, lightning_attention


class LightningAttention(nn.Module):
    """silu(qkv_proj(x)) packed per head as [q | k | v]; no 1/sqrt(d), no RoPE; decayed linear attention with a
    float32 state; RMSNorm over all heads jointly; sigmoid gate from the same input; out_proj."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.act = activation(config.hidden_act)
        width = self.num_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, 3 * width, bias=False)
        self.output_gate = Linear(config.hidden_size, width, bias=False)
        self.norm = RMSNorm(width, config.lightning_norm_eps)
        self.out_proj = Linear(width, config.hidden_size, bias=False)
        # Decay rates depend on the global layer index; kept as a plain float32 tensor so no dtype cast reaches it.
        self._rates = decay_rates(self.num_heads, layer_idx, config.num_hidden_layers, config.lightning_slopes)

    def rates(self, device: torch.device) -> torch.Tensor:
        if self._rates.device != device:
            self._rates = self._rates.to(device)
        return self._rates

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: AttentionCache | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.act(self.qkv_proj(x)).view(b, t, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # token-major [B, T, H, D] views, as the ops take them
        rates = self.rates(x.device)
        if cache is None:
            out, _ = lightning_attention(q, k, v, rates)
        else:
            out = cache.lightning_attention(self.layer_idx, q, k, v, rates)
        out = self.norm(out.reshape(b, t, self.num_heads * self.head_dim))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * out)

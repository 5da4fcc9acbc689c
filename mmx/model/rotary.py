"""Rotary position embedding on the first ``rotary_dim`` channels of each head (NeoX "rotate half" pairing).

M1 rotates 64 of 128 channels with theta 1e7, M2 64 of 128 with theta 5e6; the remaining channels pass through.
Frequencies and angles are float32, as in the official code and transformers, so positions agree bit for bit.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """Holds the float32 inverse frequencies; a plain object (not a buffer) so that casting the model to bf16
    never rounds them."""

    def __init__(self, rotary_dim: int, theta: float):
        self.rotary_dim = rotary_dim
        self.theta = theta
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
        self._inv_freq = 1.0 / (theta**exponents)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, rotary_dim], float32."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by cos / sin [B, T, rotary_dim]; channels past rotary_dim are kept."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot = x[..., :rotary_dim].float()
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)

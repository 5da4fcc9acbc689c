"""RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch
from torch import nn

from mmx.ops import fused_rows


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps). The statistic is taken in float32 and the result is cast back to the
    input dtype before the weight multiplies it, as the official code and transformers do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % fused_rows.ROW_MULTIPLE == 0 and fused_rows.takes(x, self.weight):
            return fused_rows.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

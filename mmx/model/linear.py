"""Linear maps that a compiled decode step turns into streaming dot products.

A decode step of a few sequences multiplies a handful of rows by each weight matrix, and its time is the time to
stream the weights from memory. Inside a compiled graph (:mod:`mmx.engine.decode_graph`), writing the product as a
broadcast multiply and a sum over the input dimension lets inductor generate one vectorised loop per matrix that
reads the weight once, in its natural row-major order, across all threads: 1.4-2.9x the speed of the BLAS call at
one row, and 2.6-4.2x for the MoE's chosen experts (``bench/decode_gemv.py``, 1-2 threads). At 8 rows the two are
about even; from 16 rows, and in eager code, the BLAS is used. The sum is taken in float32 whatever the weight
dtype (bf16 and int8 weights are widened as they are read).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows, a compiled step computes x @ W.T as dot products (bench/decode_gemv.py: faster than the BLAS
# below 8 rows, even at 8, slower from 16 for the dense maps; the experts still gain at 8).
FEW_ROWS = 8


def streams_rows(x: torch.Tensor) -> bool:
    """Whether ``x @ W.T`` is to be written as dot products: inside a compiled graph, with few rows."""
    return torch.compiler.is_compiling() and x.numel() <= FEW_ROWS * x.shape[-1]


def dot_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[..., out, in].T as a multiply and a float32 sum (for compiled graphs), in x's dtype.
    ``weight`` may carry leading dimensions that broadcast against x's (gathered expert weights)."""
    return (x.float().unsqueeze(-2) * weight.float()).sum(-1).to(x.dtype)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, as dot products when :func:`streams_rows`."""
    if weight.dim() == 2 and streams_rows(x):
        out = dot_rows(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose product takes :func:`project`'s path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)

"""Per-head decay rates of lightning attention: s_h such that the state decays by exp(-s_h) per token.

Two schedules exist (specs/lightning_kernels.md §1.3). Both scale a per-head base slope by a per-layer factor
that uses the *global* layer index, softmax layers included:

* official (MiniMax remote code, vLLM, SGLang): ALiBi slopes, with the interleave for head counts that are not a
  power of two, and factor ``1 - i/(L-1) + 1e-5``;
* transformers 5.23: the geometric ladder ``(2^(-8/H))^(h+1)`` and factor ``1 - i/(L-1+1e-5) + 1e-5``.

For a power-of-two head count the base slopes agree; the factors differ by < 1e-5 relative for M1's 80 layers.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes: 2^(-8(h+1)/H) for a power of two, else the power-of-two ladder interleaved with
    every other slope of the next power of two."""
    if num_heads & (num_heads - 1) == 0:
        start = 2.0 ** (-8.0 / num_heads)
        return [start ** (h + 1) for h in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def geometric_slopes(num_heads: int) -> list[float]:
    base = 1.0 / 2.0 ** (8.0 / num_heads)
    return [base ** (h + 1) for h in range(num_heads)]


def layer_factor(layer_idx: int, num_layers: int, schedule: str) -> float:
    if schedule == "transformers":
        return 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    if num_layers <= 1:
        return 1.0 + 1e-5
    return 1.0 - layer_idx / (num_layers - 1) + 1e-5


def decay_rates(num_heads: int, layer_idx: int, num_layers: int, schedule: str = "official") -> torch.Tensor:
    """float32 tensor [num_heads] of decay rates s_h for one layer."""
    if schedule == "official":
        base = alibi_slopes(num_heads)
    elif schedule == "transformers":
        base = geometric_slopes(num_heads)
    else:
        raise ValueError(f"unknown lightning slope schedule {schedule!r}")
    factor = layer_factor(layer_idx, num_layers, schedule)
    return torch.tensor([b * factor for b in base], dtype=torch.float32, device="cpu")

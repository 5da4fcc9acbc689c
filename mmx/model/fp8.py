"""Block-quantised FP8 weights (DeepSeek-V3 style, as MiniMax-M2 ships them).

Each ``float8_e4m3fn`` weight comes with ``weight_scale_inv`` holding one float32 factor per 128 x 128 block;
despite its name the factor *multiplies* the stored values: W = W_fp8 * scale[block(i), block(j)].
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def block_size_from(quantization_config: dict | None) -> tuple[int, int]:
    block = (quantization_config or {}).get("weight_block_size") or [128, 128]
    if len(block) != 2 or any(int(b) < 1 for b in block):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def expected_scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = weight_shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Dequantise an FP8 weight [..., rows, cols] with its per-block scales [..., row blocks, column blocks]; the
    last blocks may be partial. Leading dimensions (stacked experts) pair up one to one.

    Loading (dense) and :mod:`mmx.model.fp8_linear` (FP8 kept in memory) both call this, so the two give the same
    weights bit for bit: the product is formed in float32, then rounded once to ``dtype``."""
    rows, cols = weight.shape[-2:]
    expected = (*weight.shape[:-2], *expected_scale_shape((rows, cols), block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not tile a {rows}x{cols} weight "
            f"in {block[0]}x{block[1]} blocks"
        )
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for building test checkpoints and for users who want to ship FP8: per-block absmax scaling
    into float8_e4m3fn. Returns (fp8 weight, float32 weight_scale_inv)."""
    rows, cols = weight.shape
    srows, scols = expected_scale_shape((rows, cols), block)
    padded = torch.zeros(srows * block[0], scols * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(srows, block[0], scols, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(srows * block[0], scols * block[1])[:rows, :cols].contiguous(), scale

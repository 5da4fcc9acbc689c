"""Weight storage for fast decoding on the CPU.

A decode step multiplies one row (or a few) by every weight matrix, so it is bound by how fast the weights stream
from memory. ``F.linear(x, W)`` computes ``x @ W.T``; with W stored row-major ([out, in], PyTorch's default) the
BLAS reads it as a transposed operand, which runs at about half the memory bandwidth of the untransposed case
(``bench/decode_gemv.py``: 1.3-1.5x slower at one row, about equal from 4 rows). Storing W column-major, i.e.
as the contiguous [in, out] transpose seen through a transposed view, keeps every shape, value and name the same
and hands the BLAS the layout it streams fastest. Prefill is unaffected (equal or slightly faster).

The engine does this when it runs eagerly (``enforce_eager``); its compiled decode step reads weights row-major
(:mod:`mmx.model.linear`) and leaves them so.
"""

from __future__ import annotations

import torch
from torch import nn

from mmx.model.linear import ROW_SIZES, onednn_linear, onednn_pays
from mmx.model.moe import Experts


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix (or stack of matrices) with its last two dimensions stored transposed."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def is_column_major(t: torch.Tensor) -> bool:
    return t.dim() >= 2 and t.stride(-2) == 1 and t.transpose(-1, -2).is_contiguous()


def use_decode_layout(model: nn.Module) -> int:
    """Store the model's linear maps and expert matrices column-major, in place; returns how many tensors moved.
    The values are untouched (a copy, not a cast), so outputs change only by the BLAS's summation order. Skips
    what is not a plain CPU float matrix (int8 weights have their own kernel) and what is already column-major;
    weights shared between modules (a tied LM head) move once."""
    moved = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            params = [module.weight]
        elif isinstance(module, Experts):
            params = [module.gate_up_proj, module.down_proj]
        else:
            continue
        for param in params:
            if id(param) in seen or param.device.type != "cpu" or not param.is_floating_point():
                continue
            seen.add(id(param))
            if is_column_major(param) or param.shape[-1] == 1 or param.shape[-2] == 1:
                continue
            param.data = _column_major(param.data)
            moved += 1
    return moved


def warm_onednn(model: nn.Module) -> int:
    """Build oneDNN's kernel for every weight shape of ``model`` and every row count it can be called with
    (:data:`mmx.model.linear.ROW_SIZES`, where :func:`mmx.model.linear.linear` would take oneDNN), so that the first
    requests do not pay ~2 ms for each; returns how many were built. Weights are read, never written."""
    seen: set[tuple[int, ...]] = set()
    built = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weights = [module.weight]
        elif isinstance(module, Experts):
            weights = [module.gate_up_proj[0], module.down_proj[0]]
        else:
            continue
        for weight in weights:
            if weight.dim() != 2 or tuple(weight.shape) in seen:
                continue
            seen.add(tuple(weight.shape))
            with torch.inference_mode():
                for rows in ROW_SIZES:
                    x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
                    if onednn_pays(x, weight):
                        onednn_linear(x, weight)
                        built += 1
    return built

"""Block-scaled FP8 weights kept FP8 in memory (the engine's ``quantization="fp8"``; MiniMax-M2 ships them).

``load_checkpoint(..., keep_fp8=True)`` swaps each decoder-layer linear map whose checkpoint weight is FP8 for an
:class:`Fp8Linear`, and each expert block whose every slice is FP8 for an :class:`Fp8Experts`, before any storage is
allocated; the float8 bytes and their per-block factors (``weight_scale_inv``, which multiplies) are then streamed
straight into registered buffers (so ``.to(device)`` moves them). A weight takes one byte per element plus 4 bytes
per 128 x 128 block, against 2 in bf16.

Forward: each call dequantises one weight (a linear's matrix; the experts a batch is routed to) into a scratch
tensor of the activation dtype and multiplies; the scratch is dropped when the call returns, so the extra memory
peaks at one layer's weight. The dequantisation is :func:`mmx.model.fp8.dequantize_fp8`, the one the loader uses
for dense weights, so outputs equal those of the same checkpoint dequantised on load. On CUDA this is the same
dequantise-then-multiply path: correct but not fast. A scaled FP8 matmul would skip the scratch; without a GPU here
to test one against this path, it is not used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mmx.model.activation import activation
from mmx.model.fp8 import dequantize_fp8, expected_scale_shape
from mmx.model.linear import project
from mmx.model.moe import GROUPED_MAX_PAIRS, Experts, combine_per_expert, experts_pay_onednn, grouped_moe, swiglu
from mmx.utils.custom_ops import without_dynamo_import
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


class _Fp8Storage(nn.Module):
    """A module whose buffers keep their dtype: ``model.cast(torch.bfloat16)`` or ``.float()`` would otherwise widen
    the FP8 bytes (doubling their memory) and round the float32 block factors. Devices still follow ``.to()``."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        fixed = {id(b) for b in self._buffers.values() if b is not None}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in fixed and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)


class Fp8Linear(_Fp8Storage):
    """An ``nn.Linear`` whose weight is float8 with one float32 factor per block: W = qweight * scale[block]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: tuple[int, int],
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        bias: nn.Parameter | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        grid = expected_scale_shape((out_features, in_features), block)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=fp8_dtype, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(grid, dtype=torch.float32, device=device))
        self.bias = bias

    @classmethod
    def like(cls, linear: nn.Linear, block: tuple[int, int], fp8_dtype: torch.dtype) -> Fp8Linear:
        """Empty FP8 storage for ``linear``'s weight, on its device (the meta device while loading)."""
        device = linear.weight.device
        return cls(linear.in_features, linear.out_features, block, fp8_dtype, linear.bias, device)

    def store(self, expert: int | None, part: str | None, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Copy a checkpoint's FP8 weight and its factors in; returns the float32 weight they stand for (to check)."""
        self.qweight.copy_(q)
        self.weight_scale_inv.copy_(scale)
        return dequantize_fp8(q, scale, self.block, torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.qweight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, {self.qweight.dtype}, block={self.block}"


class Fp8Experts(_Fp8Storage):
    """:class:`~mmx.model.moe.Experts` with FP8 weights, stacked per layer as there ([E, 2I, D] gate|up, [E, D, I]
    down). The checkpoint scales gate (w1) and up (w3) separately, and I need not be a multiple of the block, so
    their factors stay apart: ``gate_up_scale_inv`` is [E, 2, I blocks, D blocks]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_name: str,
        block: tuple[int, int],
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        e, d, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.block = e, block
        self.act_name, self.act = act_name, activation(act_name)
        self.register_buffer("gate_up_qweight", torch.empty(e, 2 * i, d, dtype=fp8_dtype, device=device))
        gate_grid = expected_scale_shape((i, d), block)
        self.register_buffer("gate_up_scale_inv", torch.empty(e, 2, *gate_grid, dtype=torch.float32, device=device))
        self.register_buffer("down_qweight", torch.empty(e, d, i, dtype=fp8_dtype, device=device))
        down_grid = expected_scale_shape((d, i), block)
        self.register_buffer("down_scale_inv", torch.empty(e, *down_grid, dtype=torch.float32, device=device))

    @classmethod
    def like(cls, experts: Experts, block: tuple[int, int], fp8_dtype: torch.dtype) -> Fp8Experts:
        e, two_i, d = experts.gate_up_proj.shape
        return cls(e, d, two_i // 2, experts.act_name, block, fp8_dtype, experts.gate_up_proj.device)

    def store(self, expert: int | None, part: str | None, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Copy one expert's gate / up / down FP8 weight and factors in; returns the float32 weight (to check)."""
        if part == "down":
            self.down_qweight[expert].copy_(q)
            self.down_scale_inv[expert].copy_(scale)
        else:
            half = self.gate_up_qweight.shape[1] // 2
            rows, which = (slice(0, half), 0) if part == "gate" else (slice(half, None), 1)
            self.gate_up_qweight[expert, rows].copy_(q)
            self.gate_up_scale_inv[expert, which].copy_(scale)
        return dequantize_fp8(q, scale, self.block, torch.float32)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tensors = (self.gate_up_qweight, self.gate_up_scale_inv, self.down_qweight, self.down_scale_inv)
        if torch.compiler.is_compiling():  # the routing is read on the host: one opaque call in the graph
            return fp8_experts(x, ids, weights, *tensors, self.act_name, *self.block)
        return fp8_moe(x, ids, weights, *tensors, self.act, self.block)

    def extra_repr(self) -> str:
        e, two_i, d = self.gate_up_qweight.shape
        return f"experts={e}, hidden={d}, intermediate={two_i // 2}, {self.gate_up_qweight.dtype}, block={self.block}"


def _dequantize_gate_up(
    qweight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """[..., 2I, D] from gate and up dequantised each on its own block grid."""
    halves = qweight.unflatten(-2, (2, qweight.shape[-2] // 2))
    return dequantize_fp8(halves, scale, block, dtype).flatten(-3, -2)


def _grouped_ok(x: torch.Tensor, down_qweight: torch.Tensor) -> bool:
    """The conditions of :meth:`Experts.grouped_supported`, for a scratch in x's dtype."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return all(n * x.element_size() % 16 == 0 for n in down_qweight.shape[1:])


def fp8_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scale_inv: torch.Tensor,
    down_qweight: torch.Tensor,
    down_scale_inv: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    block: tuple[int, int],
) -> torch.Tensor:
    """The experts' outputs, mixed, the way :class:`Experts` picks its path: few (token, expert) pairs take the
    grouped GEMM over the chosen experts only, dequantised together; more take the per-expert loop, dequantising
    each expert as its turn comes. The routing (``ids``) is used as given, so it stays exact."""
    num_experts = gate_up_qweight.shape[0]
    grouped = ids.numel() <= GROUPED_MAX_PAIRS and _grouped_ok(x, down_qweight)
    if grouped and not experts_pay_onednn(x, ids, num_experts, gate_up_qweight[0].numel()):
        # unique() is sorted, so the local ids keep the experts' order and the grouped GEMM sums as Experts does
        chosen, local = ids.unique(return_inverse=True)
        gate_up = _dequantize_gate_up(gate_up_qweight[chosen], gate_up_scale_inv[chosen], block, x.dtype)
        down = dequantize_fp8(down_qweight[chosen], down_scale_inv[chosen], block, x.dtype)
        return grouped_moe(x, local, weights, gate_up, down, act)

    def ffn(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = _dequantize_gate_up(gate_up_qweight[expert], gate_up_scale_inv[expert], block, rows.dtype)
        down = dequantize_fp8(down_qweight[expert], down_scale_inv[expert], block, rows.dtype)
        return swiglu(rows, gate_up, down, act)

    return combine_per_expert(x, ids, weights, num_experts, ffn)


@torch.library.custom_op("mmx::fp8_experts", mutates_args=())
def fp8_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scale_inv: torch.Tensor,
    down_qweight: torch.Tensor,
    down_scale_inv: torch.Tensor,
    act_name: str,
    block_rows: int,
    block_cols: int,
) -> torch.Tensor:
    return fp8_moe(
        x,
        ids,
        weights,
        gate_up_qweight,
        gate_up_scale_inv,
        down_qweight,
        down_scale_inv,
        activation(act_name),
        (block_rows, block_cols),
    )


@fp8_experts.register_fake
def _(x, ids, weights, gate_up_qweight, gate_up_scale_inv, down_qweight, down_scale_inv, act_name, rows, cols):
    return torch.empty_like(x)


without_dynamo_import(fp8_experts)


def holds_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear | Fp8Experts) for m in model.modules())


def keep_fp8_modules(
    model: nn.Module,
    fp8_slices: Iterable[tuple[str, int | None, torch.dtype]],
    block: tuple[int, int],
) -> dict[str, Fp8Linear | Fp8Experts]:
    """Swap FP8 modules into ``model`` (best on the meta device, before its storage is allocated) for the
    checkpoint's FP8 weights, given as (model tensor name, expert index or None, stored FP8 dtype) per checkpoint
    tensor. Returns model tensor name -> the module that stores it. A decoder-layer linear map is swapped when its
    weight is FP8, an expert block when every slice is, in one FP8 dtype; anything else (an FP8 LM head, a block
    only partly FP8) is left for the loader to dequantise."""
    slices = list(fp8_slices)
    linears = {name: dtype for name, expert, dtype in slices if expert is None}
    expert_counts = Counter((name.rpartition(".")[0], dtype) for name, expert, dtype in slices if expert is not None)
    kept: dict[str, Fp8Linear | Fp8Experts] = {}
    for name, dtype in linears.items():
        path = name.removesuffix(".weight")
        module = model.get_submodule(path) if name != path and path.startswith("model.layers.") else None
        if isinstance(module, nn.Linear):
            kept[name] = _swap(model, path, Fp8Linear.like(module, block, dtype))
    for (path, dtype), count in expert_counts.items():
        module = model.get_submodule(path)
        if isinstance(module, Experts) and count == 3 * module.num_experts:
            kept[f"{path}.gate_up_proj"] = kept[f"{path}.down_proj"] = _swap(
                model, path, Fp8Experts.like(module, block, dtype)
            )
    left = len(slices) - sum(1 for name, _, _ in slices if name in kept)
    if left:
        logger.info("%d FP8 tensors are not in FP8-capable modules (or not all of a block is FP8): dequantised", left)
    return kept


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return module

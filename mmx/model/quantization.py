"""Weight quantisation schemes (the engine's ``quantization``), applied in place after loading.

- ``"int8"`` (CPU inference): every linear map inside the decoder layers (softmax-attention and lightning
  projections, the MoE experts) keeps its weight as symmetric per-output-channel int8: W ~= q * scale[row],
  q in [-127, 127]. Embeddings, norms, the router (its fp32 scores pick the experts) and the LM head stay in full
  precision. Each quantised layer then holds only its int8 weight and one scale per output channel.
- ``"experts_int8"`` (vLLM's name; for MiniMax-M1 / Text-01, whose experts are almost all of the weights): the same
  int8 for the MoE experts only; attention projections, embeddings, router and LM head keep the model dtype.
- ``"fp8"``: a block-scaled FP8 checkpoint (MiniMax-M2) keeps its FP8 weights in memory. That happens while loading
  (:mod:`mmx.model.fp8_linear`), so here it is only checked: a model holding no FP8 modules is an error.

The matmul is torch's ``_weight_int8pack_mm``: int8 weight, bf16 / fp16 activations and scales, fp32 accumulation,
the result rounded to the activation dtype. Its float32 variant is scalar code (8-40x slower than an fp32
``F.linear`` at decode shapes on AVX-512), so float32 activations go through it as bf16 and come back as float32.
It crashes (torch 2.13) when the input width is not a multiple of 16; such layers, and any device but the CPU, take
a plain dequantise-and-multiply instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmx.engine.args import QUANTIZATION_METHODS
from mmx.model.activation import activation
from mmx.model.fp8_linear import holds_fp8
from mmx.model.linear import dot_rows, streams_rows
from mmx.model.moe import Experts, combine_per_expert, grouped_kernel_takes, mix_experts
from mmx.ops.expert_rows import dense_rows, dense_takes, expert_rows
from mmx.utils.custom_ops import without_dynamo_import
from mmx.utils.logging import get_logger

logger = get_logger(__name__)
_KERNEL_WIDTH_MULTIPLE = 16


def check_quantization(method: str | None) -> str | None:
    """``method`` itself when it names a supported scheme (or is None); otherwise a ValueError naming the field."""
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None for none); got {method!r}"
        )
    return method


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the int8 kernel runs in for a model of ``dtype``."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: (q int8 [..., out, in], scale [..., out] in ``scale_dtype``).

    The scale max|row| / 127 is rounded *up* to ``scale_dtype`` before the weights are divided by it, so the stored
    scale is exact (no second rounding in the kernel) and every |q| stays <= 127."""
    w = weight.detach().float()
    ideal = w.abs().amax(dim=-1) / 127.0
    ideal = torch.where(ideal > 0, ideal, torch.ones_like(ideal))  # an all-zero row quantises to zeros
    scale = ideal.to(scale_dtype)
    scale = torch.where(scale.float() < ideal, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    q = torch.round(w / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (qweight [out, in] * scale[:, None]).T, returned in x's dtype."""
    width = x.shape[-1]
    if x.device.type != "cpu" or width % _KERNEL_WIDTH_MULTIPLE:
        return F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
    dtype = kernel_dtype(x.dtype)
    rows = x.reshape(-1, width).to(dtype).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(rows, qweight, scale.to(dtype))
    return out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is per-output-channel int8."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("int8 quantisation covers bias-free linear layers only")
        return cls(*quantize_rows(linear.weight, kernel_dtype(linear.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if streams_rows(x, self.qweight):  # compiled, few rows: int8 weights widened as they stream in
            if dense_takes(x, self.qweight):
                return dense_rows(x, self.qweight, self.weight_scale)
            return (dot_rows(x, self.qweight).float() * self.weight_scale.float()).to(x.dtype)
        return int8_matmul(x, self.qweight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Experts(nn.Module):
    """:class:`~mmx.model.moe.Experts` with int8 weights: the same per-expert loop, each expert's two matmuls in
    the int8 kernel."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.act = experts.act
        self.act_name = experts.act_name
        dtype = kernel_dtype(experts.gate_up_proj.dtype)
        gate_up, gate_up_scale = quantize_rows(experts.gate_up_proj, dtype)
        down, down_scale = quantize_rows(experts.down_proj, dtype)
        self.register_buffer("gate_up_qweight", gate_up)  # [E, 2I, D]
        self.register_buffer("gate_up_scale", gate_up_scale)  # [E, 2I]
        self.register_buffer("down_qweight", down)  # [E, D, I]
        self.register_buffer("down_scale", down_scale)  # [E, D]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            gate_up, down = self.gate_up_qweight, self.down_qweight
            if grouped_kernel_takes(x, ids, gate_up, down, self.act_name, self.gate_up_scale):
                return expert_rows(x, ids, weights, gate_up, down, self.gate_up_scale, self.down_scale)
            if streams_rows(x, self.gate_up_qweight[0]):
                return mix_experts(
                    x, ids, weights, self._gathered(ids, "gate_up"), self._gathered(ids, "down"), self.act
                )
            return int8_experts(
                x,
                ids,
                weights,
                self.gate_up_qweight,
                self.gate_up_scale,
                self.down_qweight,
                self.down_scale,
                self.act_name,
            )
        return int8_per_expert(
            x, ids, weights, self.gate_up_qweight, self.gate_up_scale, self.down_qweight, self.down_scale, self.act
        )

    def _gathered(self, ids: torch.Tensor, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        qweight, scale = getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scale")
        return lambda h: (dot_rows(h, qweight[ids]).float() * scale[ids].float()).to(h.dtype)


# The per-expert loop reads the routing on the host, which a compiled graph cannot trace: one opaque call there.
@torch.library.custom_op("mmx::int8_experts", mutates_args=())
def int8_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_qweight: torch.Tensor,
    down_scale: torch.Tensor,
    act_name: str,
) -> torch.Tensor:
    return int8_per_expert(
        x, ids, weights, gate_up_qweight, gate_up_scale, down_qweight, down_scale, activation(act_name)
    )


def int8_per_expert(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_qweight: torch.Tensor,
    down_scale: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The experts' loop with each expert's two products in the int8 kernel (eager, and inside int8_experts)."""

    def ffn(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = int8_matmul(rows, gate_up_qweight[expert], gate_up_scale[expert]).chunk(2, dim=-1)
        return int8_matmul(act(gate) * up, down_qweight[expert], down_scale[expert])

    return combine_per_expert(x, ids, weights, gate_up_qweight.shape[0], ffn)


@int8_experts.register_fake
def _(x, ids, weights, gate_up_qweight, gate_up_scale, down_qweight, down_scale, act_name):
    return torch.empty_like(x)


without_dynamo_import(int8_experts)


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight is held in a quantised form (int8 or FP8), which checkpoints do not store."""
    return holds_fp8(model) or any(isinstance(m, Int8Linear | Int8Experts) for m in model.modules())


@dataclass(frozen=True)
class QuantizationReport:
    layers: int  # linear layers and expert blocks replaced by this call
    bytes_before: int  # their weights before
    bytes_after: int  # int8 weights plus scales

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str | None) -> QuantizationReport | None:
    """Quantise ``model``'s decoder layers in place (None: leave it as is). Layers already quantised are left alone,
    so calling it twice is harmless; the report counts what this call replaced. "fp8" replaces nothing: it checks
    that the model was loaded with its FP8 weights kept."""
    if check_quantization(method) is None:
        return None
    if method == "fp8":
        if not holds_fp8(model):
            raise ValueError(
                "quantization='fp8' keeps a block-scaled FP8 checkpoint's weights in FP8 as it loads, and this model "
                "holds no FP8 weights: load it with load_model(path, quantization='fp8') (or "
                "LLMEngine.from_pretrained(path, quantization='fp8')) from an FP8 checkpoint, or use 'int8' / "
                "'experts_int8' to quantise a model already in memory"
            )
        return QuantizationReport(0, 0, 0)
    experts_only = method == "experts_int8"
    layers = before = after = 0
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not experts_only:
                new: nn.Module = Int8Linear.from_linear(child)
                old_bytes, new_bytes = _bytes(child.weight), _bytes(new.qweight, new.weight_scale)
            elif isinstance(child, Experts):
                new = Int8Experts(child)
                old_bytes = _bytes(child.gate_up_proj, child.down_proj)
                new_bytes = _bytes(*new.buffers())
            else:
                continue
            setattr(parent, name, new)
            layers, before, after = layers + 1, before + old_bytes, after + new_bytes
    report = QuantizationReport(layers, before, after)
    if layers:
        logger.info(
            "quantised %d layers to int8 (%s): weights %.1f MB -> %.1f MB", layers, method, before / 1e6, after / 1e6
        )
    return report

"""Sparse mixture of experts: M1's softmax top-k router and M2's sigmoid router with a selection-only bias.

Expert weights are stacked per layer ([E, 2I, D] gate|up and [E, D, I] down, transformers' layout) so that a
layer is two parameters, whatever the number of experts; official per-expert ``w1 / w3 / w2`` tensors are
sliced into them on load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmx.config import MiniMaxConfig
from mmx.model.activation import activation
from mmx.model.linear import (
    dot_rows,
    joined,
    linear,
    onednn_pays,
    onednn_product,
    onednn_takes,
    padded_blocks,
    streams_rows,
)
from mmx.ops import fused_rows
from mmx.ops.expert_rows import expert_rows
from mmx.ops.expert_rows import supports as expert_rows_take
from mmx.utils.custom_ops import without_dynamo_import


class TopKRouter(nn.Module):
    """Scores experts in float32 (the checkpoints store this weight in fp32, and near-ties pick differently in
    bf16) and returns renormalised weights of the chosen top-k."""

    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(
        self, x: torch.Tensor, correction_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (router logits [N, E], weights [N, k], expert ids [N, k]); all float32 but the ids."""
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast in training must not reach the router
            logits = F.linear(x.float(), self.weight.float())
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)
            weights, ids = scores.topk(self.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            # The bias steers which experts are chosen; the mixing weights stay the unbiased scores.
            choice = scores if correction_bias is None else scores + correction_bias.float()
            ids = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(-1, ids)
        return logits, weights / weights.sum(dim=-1, keepdim=True), ids


# Up to this many (token, expert) pairs, inference runs each projection as one grouped GEMM (every expert's rows in
# one call, offsets computed on the device): no host sync, no Python loop, no copy of expert weights. Above it the
# per-expert loop is as fast (bench/moe_decode.py measures both; at prefill sizes they are within noise), and it is
# also the path autograd takes, as torch's grouped GEMM has no working backward on CPU.
GROUPED_MAX_PAIRS = 256
EXPERTS_ONEDNN_MIN_MACS = 1 << 22


def combine_per_expert(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    ffn: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[t, k] * ffn(ids[t, k], x[t]), calling ``ffn`` once per expert on the rows routed to it."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # group (token, slot) pairs by expert
    token_of = order // k
    mix = weights.reshape(-1)[order].to(x.dtype)[:, None]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    routed = x.index_select(0, token_of)
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        y = ffn(expert, routed[rows]).mul_(mix[rows])
        out.index_add_(0, token_of[rows], y.to(out.dtype))  # accumulates in the activation dtype, as transformers does
        start += count
    return out


def swiglu(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """One expert on its rows: down( act(gate x) * up x ), with gate|up stacked [2I, D]. Through oneDNN, each block
    of rows goes through both products before the next (only the narrow outputs of down are joined)."""
    if onednn_pays(x, gate_up) and onednn_pays(x, down):
        products = [onednn_product(gated(onednn_product(b, gate_up), act), down) for b in padded_blocks(x)]
        return joined(products, x.shape[0])
    return linear(gated(linear(x, gate_up), act), down)


def gated(gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """act(gate) * up of the gate|up products [..., 2I]: one pass (mmx.ops.fused_rows) for SiLU where it takes them."""
    if act is F.silu and gate_up.shape[-1] % (2 * fused_rows.ROW_MULTIPLE) == 0 and fused_rows.takes(gate_up):
        return fused_rows.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class Experts(nn.Module):
    """SwiGLU experts: down( act(gate x) * up x ), evaluated on the tokens routed to each expert."""

    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        e, d, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.act_name = config.hidden_act
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        grouped = ids.numel() <= GROUPED_MAX_PAIRS and self.grouped_supported(x)
        if torch.compiler.is_compiling():
            if grouped_kernel_takes(x, ids, self.gate_up_proj, self.down_proj, self.act_name):
                return expert_rows(x, ids, weights, self.gate_up_proj, self.down_proj)
            # one opaque call in the graph (see grouped_experts)
            if grouped and not streams_rows(x, self.gate_up_proj[0]):
                return grouped_experts(x, ids, weights, self.gate_up_proj, self.down_proj, self.act_name)
            return self.forward_gathered(x, ids, weights)
        if grouped:
            return self.forward_grouped(x, ids, weights)
        return self.forward_per_expert(x, ids, weights)

    def forward_gathered(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """For compiled graphs: each token's chosen experts as dot products over their weights, read in place
        through the expert ids (inductor fuses the indexing into the loads; nothing is copied)."""
        return mix_experts(
            x,
            ids,
            weights,
            lambda h: dot_rows(h, self.gate_up_proj[ids]),
            lambda h: dot_rows(h, self.down_proj[ids]),
            self.act,
        )

    def expert_ffn(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up_proj[expert], self.down_proj[expert], self.act)

    def forward_per_expert(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return combine_per_expert(x, ids, weights, self.num_experts, self.expert_ffn)

    def grouped_supported(self, x: torch.Tensor) -> bool:
        """torch's grouped GEMM: CPU (the only device it is tested on here), no autograd, fp32 / bf16 / fp16, and
        rows that start on 16-byte boundaries."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.gate_up_proj.requires_grad):
            return False
        if self.gate_up_proj.dtype != x.dtype or self.down_proj.dtype != x.dtype:
            return False
        width = x.element_size()
        return all(n * width % 16 == 0 for n in self.down_proj.shape[1:])

    def forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return small_batch_moe(x, ids, weights, self.gate_up_proj, self.down_proj, self.act)


def grouped_kernel_takes(
    x: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_name: str,
    scale: torch.Tensor | None = None,
) -> bool:
    """Whether a compiled graph runs these experts in the grouped kernel (mmx.ops.expert_rows): SiLU experts of up
    to GROUPED_MAX_PAIRS (token, expert) pairs, that the kernel takes. Each expert is read once,
    not once per token as in the dot products; against torch's grouped GEMM and the int8 per-expert loop it is
    1.3-3.3x faster on the bench models' experts at 2-64 tokens and level at M2's expert size with 32 tokens
    (bench/expert_rows.py, docs/benchmarks.md)."""
    return act_name == "silu" and ids.numel() <= GROUPED_MAX_PAIRS and expert_rows_take(x, gate_up, down, scale)


def experts_pay_onednn(x: torch.Tensor, ids: torch.Tensor, num_experts: int, gate_up_size: int) -> bool:
    """Whether the per-expert loop through oneDNN beats torch's grouped GEMM (which runs MKL per group): when an
    expert's share of the rows, on average, makes a gate|up product of EXPERTS_ONEDNN_MIN_MACS multiply-adds
    (bench/onednn_linear.py: below that the loop's own cost eats oneDNN's gain)."""
    if not onednn_takes(x):  # first, as in onednn_pays
        return False
    rows = ids.numel() // num_experts
    return rows >= 2 and rows * gate_up_size >= EXPERTS_ONEDNN_MIN_MACS


def small_batch_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The experts of a batch of at most GROUPED_MAX_PAIRS (token, expert) pairs: torch's grouped GEMM, or the
    per-expert loop through oneDNN when :func:`experts_pay_onednn`."""
    num_experts = gate_up_proj.shape[0]
    if experts_pay_onednn(x, ids, num_experts, gate_up_proj[0].numel()):

        def ffn(expert: int, rows: torch.Tensor) -> torch.Tensor:
            return swiglu(rows, gate_up_proj[expert], down_proj[expert], act)

        return combine_per_expert(x, ids, weights, num_experts, ffn)
    return grouped_moe(x, ids, weights, gate_up_proj, down_proj, act)


def grouped_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The per-expert loop's arithmetic (same products, same accumulation order) in a fixed number of ops."""
    k = ids.shape[1]
    expert_of, order = ids.reshape(-1).sort(stable=True)
    token_of = order // k
    # offsets[e] = pairs routed to experts <= e: where each expert's rows end, found on the device
    offsets = torch.searchsorted(expert_of, torch.arange(gate_up_proj.shape[0], device=x.device), right=True)
    offsets = offsets.to(torch.int32)
    products = F.grouped_mm(x[token_of], gate_up_proj.transpose(1, 2), offs=offsets)
    y = F.grouped_mm(gated(products, act), down_proj.transpose(1, 2), offs=offsets)
    y.mul_(weights.reshape(-1)[order].to(x.dtype)[:, None])
    return torch.zeros_like(x).index_add_(0, token_of, y)


def mix_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Callable[[torch.Tensor], torch.Tensor],
    down: Callable[[torch.Tensor], torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[t, k] * down_k(act(gate_k x_t) * up_k x_t), where gate_up / down map [T, 1, D] rows to the
    chosen experts' outputs [T, k, ...] (the compiled small-batch path)."""
    gate, up = gate_up(x[:, None, :]).chunk(2, dim=-1)
    y = down(act(gate) * up)
    return (y.float() * weights[..., None].float()).sum(1).to(x.dtype)


# torch's grouped GEMM has no CPU float32 meta kernel, so a compiled graph cannot trace it; this op hides the
# grouped path behind one call (inductor treats it as an external kernel).
@torch.library.custom_op("mmx::grouped_experts", mutates_args=())
def grouped_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_name: str,
) -> torch.Tensor:
    return small_batch_moe(x, ids, weights, gate_up_proj, down_proj, activation(act_name))


@grouped_experts.register_fake
def _(x, ids, weights, gate_up_proj, down_proj, act_name):
    return torch.empty_like(x)


without_dynamo_import(grouped_experts)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = Experts(config)
        self.jitter = config.router_jitter_noise
        if config.use_routing_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_local_experts))
        else:
            self.e_score_correction_bias = None
        # Training sets this; each forward then leaves (router logits, chosen experts) here for the load-balancing
        # loss and the routing-bias update. Overwritten, not appended: activation checkpointing re-runs forwards.
        self.record_routing = False
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.training and self.jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits, weights, ids = self.gate(flat, self.e_score_correction_bias)
        if self.record_routing:
            self.routing = (logits, ids)
        return self.experts(flat, ids, weights).reshape(shape)

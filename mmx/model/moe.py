"""Sparse mixture of experts: M1's softmax top-k router and M2's sigmoid router with a selection-only bias.

Expert weights are stacked per layer ([E, 2I, D] gate|up and [E, D, I] down, transformers' layout) so that a
layer is two parameters, whatever the number of experts; official per-expert ``w1 / w3 / w2`` tensors are
sliced into them on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmx.config import MiniMaxConfig
from mmx.model.activation import activation


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


class Experts(nn.Module):
    """SwiGLU experts: down( act(gate x) * up x ), evaluated expert by expert on the tokens routed to each."""

    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        e, d, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # group (token, slot) pairs by expert
        token_of = order // k
        mix = weights.reshape(-1)[order].to(x.dtype)[:, None]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        routed = x[token_of]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            gate, up = F.linear(routed[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[expert]).mul_(mix[rows])
            out.index_add_(
                0, token_of[rows], y.to(out.dtype)
            )  # accumulates in the activation dtype, as transformers does
            start += count
        return out


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

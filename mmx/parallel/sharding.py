"""Tensor and expert parallelism, applied to a model after it is built (on the meta device or with its weights).

Which slice of each weight a rank holds (:func:`plan_cuts`), and the few modules that must talk to the other ranks:

* attention heads are split across ranks: softmax q heads and their KV heads (KV heads are replicated when there
  are fewer than ranks, each rank keeping the one its q heads read), lightning heads with their decay rates. The
  q / k / v / gate projections are column-parallel (whole heads per rank; M1 packs q|k|v per head, so its qkv_proj
  rows split by head too), the output projections row-parallel, summed over the ranks;
* RMSNorms whose statistic spans all heads (the lightning output norm, M2's QK-norm) add their sums of squares
  over the ranks, so they compute exactly what one process computes;
* the MoE is either tensor-parallel inside every expert (each rank a slice of the intermediate width) or
  expert-parallel (each rank whole experts); the router is replicated, so every rank picks the same experts;
* the embedding and the LM head are split over the vocabulary.

Norms other than those, the router and the routing bias are replicated. A rank's KV blocks and state slots hold
only its heads (:func:`local_cache_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmx.config import MiniMaxConfig
from mmx.model.attention import SoftmaxAttention
from mmx.model.lightning import LightningAttention
from mmx.model.linear import Linear, project
from mmx.model.moe import SparseMoeBlock
from mmx.model.norm import RMSNorm
from mmx.parallel.group import ParallelGroup, all_gather_last, all_reduce


@dataclass(frozen=True)
class Cut:
    """The part of a full tensor one rank holds: ``ranges`` along dimension ``dim``, concatenated in order."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This cut of ``full``, in storage of its own (a view would keep the whole tensor alive)."""
        if full.is_meta:  # only the shape: meta-device narrow / cat would load torch's Python meta kernels (~140 MB)
            shape = list(full.shape)
            shape[self.dim] = self.length
            return torch.empty(shape, dtype=full.dtype, device="meta")
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=self.dim)


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`shard_model` did, kept on the model as ``model.parallel``."""

    group: ParallelGroup
    cuts: dict[str, Cut]
    local_config: MiniMaxConfig  # the head counts one rank's attention (and its cache) has


def kv_heads_per_rank(config: MiniMaxConfig, size: int) -> int:
    return max(1, config.num_key_value_heads // size)


def check_shardable(config: MiniMaxConfig, size: int, expert_parallel: bool) -> None:
    """A ValueError naming what stops ``config`` from splitting over ``size`` ranks."""
    h, g = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if h % size:
        problems.append(f"num_attention_heads={h} is not a multiple of it")
    has_softmax = any(not config.is_lightning(i) for i in range(config.num_hidden_layers))
    if has_softmax and g % size and size % g:
        problems.append(f"num_key_value_heads={g} neither divides it nor is a multiple of it")
    if expert_parallel and config.num_local_experts % size:
        problems.append(f"num_local_experts={config.num_local_experts} is not a multiple of it (expert parallelism)")
    if not expert_parallel and config.intermediate_size % size:
        problems.append(f"intermediate_size={config.intermediate_size} is not a multiple of it")
    if config.vocab_size < size:
        problems.append(f"vocab_size={config.vocab_size} is smaller than it")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not fit this model: " + "; ".join(problems))


def local_cache_config(config: MiniMaxConfig, size: int) -> MiniMaxConfig:
    """The config whose head counts are one rank's: what its KV blocks and lightning state slots are sized by."""
    if size == 1:
        return config
    return config.replace(
        num_attention_heads=config.num_attention_heads // size, num_key_value_heads=kv_heads_per_rank(config, size)
    )


def plan_cuts(config: MiniMaxConfig, group: ParallelGroup) -> dict[str, Cut]:
    """Parameter name (the model's own names) -> the cut this rank holds; absent names are replicated."""
    check_shardable(config, group.size, group.expert_parallel)
    d = config.head_dim
    h0, h1 = group.span(config.num_attention_heads)
    g = config.num_key_value_heads
    if g >= group.size:
        g0, g1 = group.span(g)
    else:  # replicated: the KV head that this rank's q heads belong to
        g0 = group.rank * g // group.size
        g1 = g0 + 1
    heads, kv = Cut(0, ((h0 * d, h1 * d),)), Cut(0, ((g0 * d, g1 * d),))
    cuts: dict[str, Cut] = {}
    v0, v1 = group.padded_span(config.vocab_size)
    cuts["model.embed_tokens.weight"] = Cut(0, ((v0, v1),))
    cuts["lm_head.weight"] = Cut(0, ((v0, v1),))
    inter = config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if config.is_lightning(i):
            cuts[p + "self_attn.qkv_proj.weight"] = Cut(0, ((3 * h0 * d, 3 * h1 * d),))
            cuts[p + "self_attn.output_gate.weight"] = heads
            cuts[p + "self_attn.norm.weight"] = heads
            cuts[p + "self_attn.out_proj.weight"] = Cut(1, heads.ranges)
        else:
            cuts[p + "self_attn.q_proj.weight"] = heads
            cuts[p + "self_attn.k_proj.weight"] = kv
            cuts[p + "self_attn.v_proj.weight"] = kv
            cuts[p + "self_attn.o_proj.weight"] = Cut(1, heads.ranges)
            if config.use_qk_norm:
                cuts[p + "self_attn.q_norm.weight"] = heads
                cuts[p + "self_attn.k_norm.weight"] = kv
        if group.expert_parallel:
            experts = Cut(0, (group.span(config.num_local_experts),))
            cuts[p + "mlp.experts.gate_up_proj"] = experts
            cuts[p + "mlp.experts.down_proj"] = experts
        else:
            i0, i1 = group.span(inter)
            cuts[p + "mlp.experts.gate_up_proj"] = Cut(1, ((i0, i1), (inter + i0, inter + i1)))
            cuts[p + "mlp.experts.down_proj"] = Cut(2, ((i0, i1),))
    return cuts


# ---------------------------------------------------------------------------------------------------- modules
def _sum_over_ranks(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a row-parallel block: each rank holds a partial sum of the output."""
    return all_reduce(output)


class ShardedRMSNorm(RMSNorm):
    """An RMSNorm over channels spread across ranks: each holds ``weight``'s slice, and the mean square is taken
    over all ``width`` channels. ``replicas``: ranks that hold the same channels (replicated KV heads), whose sums
    would otherwise count more than once."""

    def __init__(self, norm: RMSNorm, width: int, replicas: int):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.width = width
        self.replicas = replicas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        square_sum = all_reduce(xf.pow(2).sum(-1, keepdim=True))
        xf = xf * torch.rsqrt(square_sum / (self.width * self.replicas) + self.eps)
        return self.weight * xf.to(dtype)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, stop) of the embedding; other ids give zeros here, and the sum over ranks is the lookup."""

    def __init__(self, embedding: nn.Embedding, start: int, stop: int):
        super().__init__(stop - start, embedding.embedding_dim, _weight=embedding.weight)
        self.start, self.stop = start, stop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside[..., None], 0))


class VocabParallelHead(Linear):
    """The LM head's rows [start, stop) of the vocabulary; the ranks' logits are gathered into the full row."""

    def __init__(self, head: nn.Linear, vocab_size: int, group: ParallelGroup):
        super().__init__(head.in_features, head.weight.shape[0], bias=False, device="meta")
        self.weight = head.weight
        self.vocab_size = vocab_size
        self.size = group.size
        self.each = -(-vocab_size // group.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = project(x, self.weight)
        if local.shape[-1] < self.each:  # the last ranks hold fewer rows (or none): pad to the common width
            local = F.pad(local, (0, self.each - local.shape[-1]))
        return all_gather_last(local, self.size)[..., : self.vocab_size]


class ExpertParallelMoe(SparseMoeBlock):
    """A MoE block holding experts [first, first + count): every rank routes every token (same router, same
    choices), runs the pairs routed to its own experts, and the ranks' outputs are summed."""

    first_expert: int
    num_local_experts: int  # (read here, not from the experts: quantisation replaces that module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, weights, ids = self.gate(flat, self.e_score_correction_bias)
        local = ids - self.first_expert
        tokens, slots = ((local >= 0) & (local < self.num_local_experts)).nonzero(as_tuple=True)
        out = torch.zeros_like(flat)
        if tokens.numel():
            mine = self.experts(flat[tokens], local[tokens, slots, None], weights[tokens, slots, None])
            out.index_add_(0, tokens, mine)
        return all_reduce(out).reshape(shape)


def _replace_parameter(module: nn.Module, name: str, cut: Cut) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(cut.take(old.detach()), requires_grad=old.requires_grad))
    if isinstance(module, nn.Linear):  # what code that rebuilds the layer (quantisation) reads
        module.out_features, module.in_features = module.weight.shape


def shard_model(model: nn.Module, group: ParallelGroup) -> ShardInfo:
    """Keep this rank's slices of ``model``'s weights (in place, on whatever device they are, meta included) and
    wire in the collectives. Parameter names do not change."""
    config: MiniMaxConfig = model.config
    if group.size == 1:
        info = ShardInfo(group, {}, config)
        model.parallel = info
        return info
    cuts = plan_cuts(config, group)
    tied = config.tie_word_embeddings
    modules = dict(model.named_modules())
    for name, cut in cuts.items():
        if tied and name == "lm_head.weight":
            continue  # the embedding's, cut once
        owner, _, attr = name.rpartition(".")
        _replace_parameter(modules[owner], attr, cut)
    h_local = config.num_attention_heads // group.size
    g_local = kv_heads_per_rank(config, group.size)
    kv_replicas = max(1, group.size // config.num_key_value_heads)
    d = config.head_dim
    h0, h1 = group.span(config.num_attention_heads)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.num_heads = h_local
        if isinstance(attn, LightningAttention):
            attn._rates = attn._rates[h0:h1].clone()
            attn.norm = ShardedRMSNorm(attn.norm, config.num_attention_heads * d, 1)
        elif isinstance(attn, SoftmaxAttention):
            attn.num_kv_heads = g_local
            if attn.q_norm is not None:
                attn.q_norm = ShardedRMSNorm(attn.q_norm, config.num_attention_heads * d, 1)
                attn.k_norm = ShardedRMSNorm(attn.k_norm, config.num_key_value_heads * d, kv_replicas)
        attn.register_forward_hook(_sum_over_ranks)
        moe = layer.mlp
        if group.expert_parallel:
            moe.__class__ = ExpertParallelMoe  # same parameters, a forward that runs only the local experts
            moe.first_expert = group.span(config.num_local_experts)[0]
            moe.num_local_experts = moe.experts.num_experts = config.num_local_experts // group.size
        else:
            moe.register_forward_hook(_sum_over_ranks)
    v0, v1 = group.padded_span(config.vocab_size)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, v0, v1)
    model.lm_head = VocabParallelHead(model.lm_head, config.vocab_size, group)
    model.tie_weights()
    info = ShardInfo(group, cuts, local_cache_config(config, group.size))
    model.parallel = info
    return info


def local_config(model: nn.Module) -> MiniMaxConfig:
    """The config that sizes ``model``'s cache: its own, or one rank's when sharded."""
    info = getattr(model, "parallel", None)
    return model.config if info is None else info.local_config

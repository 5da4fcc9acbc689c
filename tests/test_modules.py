"""Building blocks against plain independent formulas: RMSNorm, partial RoPE, QK-norm, routing, experts."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from mmx import MiniMaxConfig
from mmx.model.attention import SoftmaxAttention
from mmx.model.moe import SparseMoeBlock
from mmx.model.norm import RMSNorm
from mmx.model.rotary import RotaryEmbedding, apply_rotary

from .conftest import randomize


def test_rmsnorm_computes_in_float32():
    x = (torch.randn(4, 64) * 300).bfloat16()
    norm = RMSNorm(64, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 64))
    xd = x.double()
    expected = (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16).double()
    expected = expected * norm.weight.double()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=8e-3, atol=0)


def test_partial_rotary_rotates_only_the_first_channels():
    d, r, theta = 16, 8, 10_000.0
    x = torch.randn(1, 2, 5, d)
    pos = torch.arange(5)[None]
    cos, sin = RotaryEmbedding(r, theta)(pos)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[..., r:], x[..., r:], rtol=0, atol=0)
    for p in range(5):  # pairs (j, j + r/2) rotate by p * theta^(-2j/r)
        for j in range(r // 2):
            angle = p * theta ** (-2 * j / r)
            a, b = x[0, :, p, j], x[0, :, p, j + r // 2]
            torch.testing.assert_close(out[0, :, p, j], a * math.cos(angle) - b * math.sin(angle))
            torch.testing.assert_close(out[0, :, p, j + r // 2], b * math.cos(angle) + a * math.sin(angle))


def test_m2_qk_norm_spans_all_heads():
    config = MiniMaxConfig.from_preset("tiny-m2")
    attn = randomize(SoftmaxAttention(config, 0))
    x = torch.randn(1, 3, config.hidden_size)
    q = attn.q_proj(x)
    expected = attn.q_norm.weight * q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    torch.testing.assert_close(attn.q_norm(q), expected)
    # a per-head norm would give a different answer: the statistic really is over the full width
    per_head = q.view(1, 3, -1, config.head_dim)
    per_head = (per_head / torch.sqrt(per_head.pow(2).mean(-1, keepdim=True) + 1e-6)).view_as(q)
    assert not torch.allclose(attn.q_norm(q), attn.q_norm.weight * per_head, atol=1e-3)


def _dense_moe(block: SparseMoeBlock, x: torch.Tensor, softmax: bool, top_k: int) -> torch.Tensor:
    """Every token through the chosen experts, one token at a time."""
    out = torch.zeros_like(x)
    logits = x.double() @ block.gate.weight.double().T
    for t in range(x.shape[0]):
        if softmax:
            probs = logits[t].softmax(-1)
            chosen = probs.topk(top_k).indices
        else:
            probs = logits[t].sigmoid()
            chosen = (probs + block.e_score_correction_bias.double()).topk(top_k).indices
        w = probs[chosen] / probs[chosen].sum()
        for weight, e in zip(w, chosen):
            gate, up = (block.experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
            y = block.experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)
            out[t] += (weight * y).float()
    return out


def test_m1_router_softmax_topk_renormalised():
    config = MiniMaxConfig.from_preset("tiny-m1", num_experts_per_tok=3)
    block = randomize(SparseMoeBlock(config))
    x = torch.randn(17, config.hidden_size)
    torch.testing.assert_close(block(x), _dense_moe(block, x, softmax=True, top_k=3), rtol=1e-5, atol=1e-5)
    _, weights, _ = block.gate(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(17))


def test_m2_routing_bias_selects_but_does_not_weight():
    config = MiniMaxConfig.from_preset("tiny-m2")
    block = randomize(SparseMoeBlock(config), bias_scale=0.5)
    x = torch.randn(33, config.hidden_size)
    torch.testing.assert_close(block(x), _dense_moe(block, x, softmax=False, top_k=2), rtol=1e-5, atol=1e-5)
    logits, weights, ids = block.gate(x, block.e_score_correction_bias)
    _, _, unbiased_ids = block.gate(x, None)
    assert not torch.equal(ids.sort(-1).values, unbiased_ids.sort(-1).values)  # the bias changes choices
    scores = logits.sigmoid().gather(-1, ids)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))  # weights stay unbiased


def test_router_stays_float32_in_a_bf16_model():
    from mmx import MiniMaxForCausalLM

    model = MiniMaxForCausalLM(MiniMaxConfig.from_preset("tiny-m2")).cast(torch.bfloat16)
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["kernel", "log-sum-exp", "blocked-mask"])
@pytest.mark.parametrize("heads, kv_heads, t, past", [(4, 2, 7, 13), (8, 8, 33, 100), (6, 1, 40, 3)])
def test_chunk_continuation_attention(path, heads, kv_heads, t, past, monkeypatch):
    """A prefill chunk after cached keys (query i at position past + i) against a dense masked float64 reference,
    through the one-pass kernel (mmx.ops.fused_rows), and without it through the mask-free log-sum-exp merge of two
    flash calls and through the blocked masked fallback."""
    import mmx.model.cache as cache_module
    from mmx.ops import fused_rows

    calls = []
    real = fused_rows.attention
    monkeypatch.setattr(fused_rows, "attention", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(fused_rows, "_library", None if path == "kernel" else False)
    if path == "blocked-mask":
        monkeypatch.setattr(cache_module, "_FLASH_CPU", None)
        monkeypatch.setattr(cache_module, "MASKED_QUERY_BLOCK", 8)
    q, k, v = (
        torch.randn(1, heads, t, 16),
        torch.randn(1, kv_heads, past + t, 16),
        torch.randn(1, kv_heads, past + t, 16),
    )
    rows = torch.arange(t)[:, None] + past
    mask = torch.arange(past + t)[None, :] <= rows
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25, enable_gqa=True
    )
    torch.testing.assert_close(
        cache_module.causal_softmax(q, k, v, 0.25, q_offset=past).double(), expected, rtol=1e-5, atol=1e-5
    )
    assert len(calls) == (path == "kernel" and shutil.which("gcc") is not None)

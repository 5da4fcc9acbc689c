"""The MoE's grouped-GEMM path for small batches against the per-expert loop and a float64 reference: same
experts, same outputs, no host sync, and unchanged greedy decoding."""

from __future__ import annotations

import pytest
import torch

import mmx.model.moe as moe
from mmx import MiniMaxConfig
from mmx.model.generate import greedy_generate
from mmx.model.moe import Experts, SparseMoeBlock

from .conftest import randomize, tiny_model


def _block(preset: str, dtype: torch.dtype) -> SparseMoeBlock:
    model = tiny_model(preset)
    block = model.model.layers[1].mlp
    if dtype != torch.float32:
        model.cast(dtype)  # keeps the router in float32, as loading does
    return block


def _reference(block: SparseMoeBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by the block's own router, then every chosen expert evaluated token by token in float64."""
    _, weights, ids = block.gate(x, block.e_score_correction_bias)
    ex = block.experts
    assert ex.act is torch.nn.functional.silu
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            h = ex.gate_up_proj[e].double() @ x[t].double()
            gate, up = h.chunk(2)
            out[t] += weights[t, slot].double() * (ex.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out, ids


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_matches_the_per_expert_loop(preset, dtype, monkeypatch):
    block = _block(preset, dtype)
    ex = block.experts
    for t in range(1, 9):
        x = torch.randn(t, block.experts.down_proj.shape[1]).to(dtype)
        with torch.no_grad():
            _, weights, ids = block.gate(x, block.e_score_correction_bias)
            grouped = ex.forward_grouped(x, ids, weights)
            looped = ex.forward_per_expert(x, ids, weights)
            # the block takes the grouped path at these sizes: with the loop disabled it still answers
            monkeypatch.setattr(ex, "forward_per_expert", None)
            through_block = block(x)
            monkeypatch.undo()
        ref, ref_ids = _reference(block, x)
        assert torch.equal(ids, ref_ids)
        # bf16 rounds every intermediate: compared with the output's scale rather than element by element
        atol = 1e-5 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
        torch.testing.assert_close(grouped.double(), ref, rtol=1e-5, atol=atol)
        torch.testing.assert_close(grouped, looped, rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
        torch.testing.assert_close(through_block, grouped, rtol=0, atol=0)


def test_m2_routing_bias_changes_the_choice_the_same_way_on_both_paths():
    block = _block("tiny-m2", torch.float32)
    x = torch.randn(6, block.experts.down_proj.shape[1])
    with torch.no_grad():
        block.e_score_correction_bias.zero_()
        unbiased = block.gate(x, block.e_score_correction_bias)[2]
        block.e_score_correction_bias[unbiased[:, 0]] -= 10.0  # push every token off its first choice
        _, weights, ids = block.gate(x, block.e_score_correction_bias)
        grouped = block.experts.forward_grouped(x, ids, weights)
    assert not torch.equal(ids, unbiased)
    ref, _ = _reference(block, x)
    torch.testing.assert_close(grouped.double(), ref, rtol=1e-5, atol=1e-5)


def test_grouped_path_does_not_sync_with_the_host(monkeypatch):
    block = _block("tiny-m2", torch.float32)
    x = torch.randn(4, block.experts.down_proj.shape[1])
    with torch.no_grad():
        _, weights, ids = block.gate(x, block.e_score_correction_bias)
        expected = block.experts.forward_per_expert(x, ids, weights)

        def host_sync(*args, **kwargs):
            raise AssertionError("host sync in the MoE fast path")

        for name in ("tolist", "item", "__bool__", "__int__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, host_sync)
        out = block(x)
    monkeypatch.undo()
    torch.testing.assert_close(out, expected)


def test_large_batches_and_autograd_take_the_loop(monkeypatch):
    block = _block("tiny-m1", torch.float32)
    ex = block.experts
    d = ex.down_proj.shape[1]
    monkeypatch.setattr(ex, "forward_grouped", None)  # any call would fail
    with torch.no_grad():
        block(torch.randn(moe.GROUPED_MAX_PAIRS // 2 + 1, d))  # (k = 2) pairs above the threshold
    x = torch.randn(3, d, requires_grad=True)
    block(x).sum().backward()  # grad enabled: the loop, which autograd differentiates
    assert x.grad is not None and ex.gate_up_proj.grad is not None and ex.down_proj.grad.abs().sum() > 0


def test_rows_off_16_byte_boundaries_take_the_loop(monkeypatch):
    config = MiniMaxConfig.from_preset("tiny-m1", intermediate_size=30)  # 30 fp32 = 120 bytes per row
    ex = randomize(Experts(config))
    monkeypatch.setattr(ex, "forward_grouped", None)
    x = torch.randn(2, config.hidden_size)
    ids, weights = torch.tensor([[0, 1], [2, 1]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    with torch.no_grad():
        torch.testing.assert_close(ex(x, ids, weights), ex.forward_per_expert(x, ids, weights))


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
def test_greedy_decode_is_unchanged(preset, monkeypatch):
    model = tiny_model(preset)
    prompt = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    fast = greedy_generate(model, prompt, 16)
    with torch.no_grad():
        fast_logits = model(prompt)
    monkeypatch.setattr(moe, "GROUPED_MAX_PAIRS", 0)  # every forward through the per-expert loop
    assert torch.equal(greedy_generate(model, prompt, 16), fast)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), fast_logits, rtol=1e-5, atol=1e-5)

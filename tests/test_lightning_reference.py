"""The reference lightning op: recurrent == blocked == float64 naive, states included, and the decay schedules."""

from __future__ import annotations

import math

import pytest
import torch

from mmx.ops import decay_rates, lightning_blocked, lightning_naive, lightning_recurrent
from mmx.ops.slopes import alibi_slopes, geometric_slopes


def _inputs(b=2, h=3, t=37, d=8, dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g, dtype=dtype)
    state = torch.randn(b, h, d, dv, generator=g, dtype=torch.float32)
    rates = torch.tensor([0.9, 0.05, 1e-5], dtype=torch.float32)[:h]
    return q, k, v, rates, state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_naive_matches_hand_recurrence_on_one_head():
    q, k, v, rates, state = _inputs(b=1, h=1, t=5, d=2, dv=2)
    out, final = lightning_naive(q, k, v, rates[:1], state)
    lam = math.exp(-rates[0].item())
    s = state[0, 0].double()
    for t in range(5):
        s = lam * s + torch.outer(k[0, 0, t], v[0, 0, t])
        torch.testing.assert_close(out[0, 0, t], q[0, 0, t] @ s)
    torch.testing.assert_close(final[0, 0], s)


@pytest.mark.parametrize("t", [1, 5, 37, 64])
@pytest.mark.parametrize("block", [1, 3, 16, 256])
@pytest.mark.parametrize("with_state", [False, True])
def test_blocked_and_recurrent_match_naive(t, block, with_state):
    q, k, v, rates, state = _inputs(t=t)
    state = state if with_state else None
    ref_out, ref_state = lightning_naive(q, k, v, rates, state)
    out, final = lightning_blocked(q.float(), k.float(), v.float(), rates, state, block_size=block)
    assert final.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-6 and _rel(final, ref_state) < 1e-6
    out_r, final_r = lightning_recurrent(q.float(), k.float(), v.float(), rates, state)
    assert _rel(out_r, ref_out) < 1e-6 and _rel(final_r, ref_state) < 1e-6


def test_split_prefill_equals_one_shot():
    q, k, v, rates, _ = _inputs(t=50)
    q, k, v = q.float(), k.float(), v.float()
    full, full_state = lightning_blocked(q, k, v, rates, block_size=8)
    a, mid = lightning_blocked(q[:, :, :19], k[:, :, :19], v[:, :, :19], rates, block_size=8)
    b, end = lightning_blocked(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], rates, mid, block_size=8)
    assert _rel(torch.cat((a, b), dim=2), full) < 1e-6 and _rel(end, full_state) < 1e-6


def test_bf16_inputs_keep_a_float32_state():
    q, k, v, rates, state = _inputs(t=40)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, final = lightning_blocked(q, k, v, rates, state, block_size=16)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref_out, ref_state = lightning_naive(q, k, v, rates, state)  # oracle on the same rounded inputs
    assert _rel(out, ref_out) < 5e-3 and _rel(final, ref_state) < 1e-6


def test_slope_values_from_the_spec():
    m1 = decay_rates(64, 0, 80, "official") / (1 + 1e-5)
    assert m1[0].item() == pytest.approx(0.91700404, rel=1e-6)
    assert m1[3].item() == pytest.approx(0.70710678, rel=1e-6)
    assert m1[63].item() == pytest.approx(0.00390625, rel=1e-6)
    # per-layer factors of M1 (global layer index, softmax layers counted)
    assert (decay_rates(64, 40, 80)[0] / 0.91700404).item() == pytest.approx(0.4936809, rel=1e-5)
    assert (decay_rates(64, 78, 80)[0] / 0.91700404).item() == pytest.approx(0.0126682, rel=1e-4)
    assert decay_rates(64, 79, 80)[1].item() == pytest.approx(0.84089642 * 1e-5, rel=1e-5)
    # Non-power-of-two heads: the two schedules differ (specs/lightning_kernels.md §1.3)
    assert alibi_slopes(6) == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])
    assert geometric_slopes(6) == pytest.approx([0.397, 0.157, 0.0625, 0.0248, 0.0098, 0.0039], abs=6e-4)
    assert alibi_slopes(8) == pytest.approx(geometric_slopes(8))


def test_bad_shapes_are_rejected():
    q, k, v, rates, _ = _inputs()
    with pytest.raises(ValueError, match="decay rates"):
        lightning_blocked(q, k, v, rates[:2])
    with pytest.raises(ValueError, match="expected q, k"):
        lightning_blocked(q[0], k[0], v[0], rates)

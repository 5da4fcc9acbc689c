"""Lightning attention ops: every form against the float64 oracle, forward and backward; state hand-off between
chunks and calls; odd lengths; varlen == per-sequence; padded batches; decode and prefill into a state pool;
decay schedules."""

from __future__ import annotations

import math

import pytest
import torch

from mmx.ops import (
    decay_rates,
    lightning_attention,
    lightning_blocked,
    lightning_chunked,
    lightning_decode,
    lightning_naive,
    lightning_prefill,
    lightning_prefix_states,
    lightning_recurrent,
)
from mmx.ops.slopes import alibi_slopes, geometric_slopes

RATES = torch.tensor([0.9, 0.05, 1e-5])  # strong, medium and almost no decay (M1's first and last layers)


def _inputs(b=2, t=37, h=3, d=8, dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, h, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=g, dtype=dtype)
    state = torch.randn(b, h, d, dv, generator=g, dtype=torch.float32)
    return q, k, v, RATES[:h].clone(), state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_naive_matches_hand_recurrence_on_one_head():
    q, k, v, rates, state = _inputs(b=1, t=5, h=1, d=2, dv=2)
    out, final = lightning_naive(q, k, v, rates, state)
    lam = math.exp(-rates[0].item())
    s = state[0, 0].double()
    for t in range(5):
        s = lam * s + torch.outer(k[0, t, 0], v[0, t, 0])
        torch.testing.assert_close(out[0, t, 0], q[0, t, 0] @ s)
    torch.testing.assert_close(final[0, 0], s)


@pytest.mark.parametrize("t", [1, 5, 37, 64, 130])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_every_form_matches_the_oracle(t, chunk, with_state):
    q, k, v, rates, state = _inputs(t=t)
    state = state if with_state else None
    ref_out, ref_state = lightning_naive(q, k, v, rates, state)
    q32, k32, v32 = q.float(), k.float(), v.float()
    for name, (out, final) in {
        "chunked": lightning_chunked(q32, k32, v32, rates, state, chunk),
        "blocked": lightning_blocked(q32, k32, v32, rates, state, chunk),
        "recurrent": lightning_recurrent(q32, k32, v32, rates, state),
    }.items():
        assert final.dtype == torch.float32, name
        assert _rel(out, ref_out) < 1e-5 and _rel(final, ref_state) < 1e-5, name
    out64, final64 = lightning_chunked(q, k, v, rates, state, chunk)  # float64 in, float64 state: exact
    assert _rel(out64, ref_out) < 1e-12 and _rel(final64, ref_state) < 1e-12


def test_default_chunk_sizes_on_long_input():
    q, k, v, rates, state = _inputs(b=1, t=700, h=3, d=16, dv=16, dtype=torch.float32)
    ref_out, ref_state = lightning_naive(q, k, v, rates, state)
    out, final = lightning_attention(q, k, v, rates, state)
    assert _rel(out, ref_out) < 1e-5 and _rel(final, ref_state) < 1e-5


def test_underflowing_decay_stays_finite():
    """Fast-decaying heads over long chunks underflow to exactly zero instead of subnormals or NaN."""
    q, k, v, _, state = _inputs(t=300, h=2, dtype=torch.float32)
    rates = torch.tensor([100.0, 3.0])
    out, final = lightning_chunked(q, k, v, rates, state, 128)
    ref_out, ref_state = lightning_naive(q, k, v, rates, state)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert _rel(out, ref_out) < 1e-5 and _rel(final, ref_state) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_a_float32_state(dtype):
    q, k, v, rates, state = _inputs(b=1, t=300, h=3, d=32, dv=32, dtype=torch.float32)
    q, k, v = (torch.nn.functional.silu(x).to(dtype) for x in (q, k, v))
    out, final = lightning_attention(q, k, v, rates, state)
    assert out.dtype == dtype and final.dtype == torch.float32
    ref_out, ref_state = lightning_naive(q, k, v, rates, state)  # oracle on the same rounded inputs
    assert _rel(out, ref_out) < 5e-3 and _rel(final, ref_state) < 5e-3


def test_state_hand_off_between_calls_and_decode():
    """Prefill in uneven pieces, then decode token by token: the same as one pass over everything."""
    q, k, v, rates, state = _inputs(b=2, t=61, dtype=torch.float32)
    full, full_state = lightning_attention(q, k, v, rates, state)
    pieces, s = [], state
    for a, b in [(0, 7), (7, 40), (40, 50)]:
        o, s = lightning_attention(q[:, a:b], k[:, a:b], v[:, a:b], rates, s)
        pieces.append(o)
    s = s.clone()
    for t in range(50, 61):
        pieces.append(lightning_decode(q[:, t], k[:, t], v[:, t], rates, s)[:, None])
    assert _rel(torch.cat(pieces, dim=1), full) < 1e-5 and _rel(s, full_state) < 1e-5


@pytest.mark.parametrize("with_state", [False, True])
def test_prefix_states_equal_the_recurrence_stopped_there(with_state):
    """The closed form that prefix caching keeps snapshots with: the state after the first e tokens, for several e
    at once, is the float64 recurrence's final state over those tokens."""
    q, k, v, rates, state = _inputs(b=1, t=45)
    initial = state[0] if with_state else None
    ends = [1, 17, 44, 45]
    got = lightning_prefix_states(k[0], v[0], rates, initial, ends)
    assert got.dtype == torch.float32 and got.shape == (4, 3, 8, 6)
    for e, kept in zip(ends, got):
        _, want = lightning_naive(q[:, :e], k[:, :e], v[:, :e], rates, state[:1] if with_state else None)
        assert _rel(kept, want[0]) < 1e-5, e


def test_varlen_equals_per_sequence():
    lengths = [5, 0, 130, 1, 64]
    q, k, v, rates, _ = _inputs(b=1, t=sum(lengths), dtype=torch.float32)
    states = torch.randn(len(lengths), 3, 8, 6)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, finals = lightning_attention(q, k, v, rates, states, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref_out, ref_state = lightning_naive(q[:, a:b], k[:, a:b], v[:, a:b], rates, states[i : i + 1])
        if b > a:
            assert _rel(out[:, a:b], ref_out) < 1e-5
        assert _rel(finals[i : i + 1], ref_state) < 1e-5, i
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attention(q, k, v, rates, cu_seqlens=torch.tensor([0, 3]))


def test_padded_rows_equal_unpadded_runs():
    q, k, v, rates, state = _inputs(b=3, t=40, dtype=torch.float32)
    lengths = [40, 17, 0]
    out, finals = lightning_attention(q, k, v, rates, state, lengths=lengths)
    for b, n in enumerate(lengths):
        ref_out, ref_state = lightning_naive(
            q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], rates, state[b : b + 1]
        )
        if n:
            assert _rel(out[b : b + 1, :n], ref_out) < 1e-5
        assert (out[b, n:] == 0).all()
        assert _rel(finals[b : b + 1], ref_state) < 1e-5


def test_pool_decode_and_prefill_touch_only_their_slots():
    h, d = 3, 8
    rates = RATES.clone()
    pool = torch.randn(6, h, d, d)
    before = pool.clone()
    slots = torch.tensor([4, 1])
    q, k, v = (torch.randn(2, h, d) for _ in range(3))
    out = lightning_decode(q, k, v, rates, pool, slots)
    for i, slot in enumerate(slots.tolist()):
        ref, ref_state = lightning_naive(
            q[i, None, None], k[i, None, None], v[i, None, None], rates, before[slot, None]
        )
        assert _rel(out[i], ref[0, 0]) < 1e-6 and _rel(pool[slot], ref_state[0]) < 1e-6
    untouched = [0, 2, 3, 5]
    assert torch.equal(pool[untouched], before[untouched])
    # prefill two packed sequences: slot 0 starts fresh, slot 2 continues from what it holds
    qp, kp, vp = (torch.randn(1, 13, h, d) for _ in range(3))
    cu, slots = torch.tensor([0, 9, 13]), torch.tensor([0, 2])
    held = pool[2].clone()
    out = lightning_prefill(qp, kp, vp, rates, cu, pool, slots, torch.tensor([False, True]))
    ref0, s0 = lightning_naive(qp[:, :9], kp[:, :9], vp[:, :9], rates)
    ref1, s1 = lightning_naive(qp[:, 9:], kp[:, 9:], vp[:, 9:], rates, held[None])
    assert _rel(out[:, :9], ref0) < 1e-6 and _rel(out[:, 9:], ref1) < 1e-6
    assert _rel(pool[0], s0[0]) < 1e-6 and _rel(pool[2], s1[0]) < 1e-6
    assert torch.equal(pool[[3, 5]], before[[3, 5]])


# ---------------------------------------------------------------------------------------------------- backward
def test_gradcheck_float64():
    """Analytical gradients of q, k, v and the initial state, through both outputs (o and the final state)."""
    q, k, v, rates, state = _inputs(b=2, t=11, h=3, d=4, dv=3)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, state.double())]
    assert torch.autograd.gradcheck(lambda q, k, v, s: lightning_chunked(q, k, v, rates, s, 4), inputs)


@pytest.mark.parametrize("chunk", [8, 64])
def test_float32_gradients_match_the_oracle(chunk):
    q, k, v, rates, state = _inputs(b=2, t=75, dtype=torch.float32)
    weights = torch.randn(2, 75, 3, 6)
    state_weights = torch.randn(2, 3, 8, 6)

    def grads(fn, dtype):
        xs = [x.to(dtype).clone().requires_grad_() for x in (q, k, v, state)]
        out, final = fn(*xs)
        ((out * weights.to(dtype)).sum() + (final * state_weights.to(dtype)).sum()).backward()
        return [x.grad for x in xs]

    ours = grads(lambda q, k, v, s: lightning_chunked(q, k, v, rates, s, chunk), torch.float32)
    oracle = grads(lambda q, k, v, s: lightning_naive(q, k, v, rates, s), torch.float64)
    for name, a, b in zip(["q", "k", "v", "s0"], ours, oracle):
        assert _rel(a, b) < 1e-5, name


def test_varlen_backward_matches_per_sequence():
    q, k, v, rates, _ = _inputs(b=1, t=30, dtype=torch.float32)
    cu = torch.tensor([0, 12, 30])
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = lightning_attention(*xs, rates, cu_seqlens=cu)
    out.square().sum().backward()
    refs = [x.double().clone().requires_grad_() for x in (q, k, v)]
    total = sum(lightning_naive(*(r[:, a:b] for r in refs), rates)[0].square().sum() for a, b in [(0, 12), (12, 30)])
    total.backward()
    for x, r in zip(xs, refs):
        assert _rel(x.grad, r.grad) < 1e-5


# ---------------------------------------------------------------------------------------------------- decay schedules
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


def test_bad_inputs_are_rejected():
    q, k, v, rates, _ = _inputs()
    with pytest.raises(ValueError, match="decay rates"):
        lightning_attention(q, k, v, rates[:2])
    with pytest.raises(ValueError, match="expected q, k"):
        lightning_attention(q[0], k[0], v[0], rates)
    with pytest.raises(ValueError, match="lengths"):
        lightning_attention(q, k, v, rates, lengths=[3])
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, k, v, rates, backend="cuda-magic")

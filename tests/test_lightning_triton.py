"""The Triton kernels against the float64 oracle: on a GPU when there is one, else in Triton's interpreter on CPU
(conftest sets TRITON_INTERPRET=1). bf16 is checked on GPUs only: the interpreter cannot compute in bf16."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

import mmx
from mmx.ops import lightning_attention, lightning_decode, lightning_naive, lightning_prefill
from mmx.ops.lightning import use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16
RATES = torch.tensor([0.9, 0.05, 1e-5], device=DEVICE)


def slow_in_interpreter(test: Callable[..., None]) -> Callable[..., None]:
    """Mark ``test`` slow where Triton runs in its CPU interpreter: a whole model through the interpreter takes
    7-14 s (each kernel test here 2 s or less), so on CPU it runs with `make test-all`. On a GPU the kernels are
    compiled, not interpreted, so it stays in the default suite."""
    return pytest.mark.slow(test) if DEVICE == "cpu" else test


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("shape", [(2, 70, 3, 8, 6), (1, 130, 3, 32, 80), (1, 64, 3, 128, 128)])
def test_forward_and_backward_match_the_oracle(shape):
    b, t, h, d, dv = shape
    q, k, v, s0 = _rand(b, t, h, d), _rand(b, t, h, d), _rand(b, t, h, dv), _rand(b, h, d, dv)
    w_out, w_state = _rand(b, t, h, dv), _rand(b, h, d, dv)
    xs = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    out, final = lightning_attention(*xs[:3], RATES, xs[3], backend="triton")
    ((out * w_out).sum() + (final * w_state).sum()).backward()
    refs = [x.double().clone().requires_grad_() for x in (q, k, v, s0)]
    ref_out, ref_final = lightning_naive(*refs[:3], RATES, refs[3])
    ((ref_out * w_out.double()).sum() + (ref_final * w_state.double()).sum()).backward()
    assert final.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-5 and _rel(final, ref_final) < 1e-5
    for name, x, r in zip(["q", "k", "v", "s0"], xs, refs):
        assert _rel(x.grad, r.grad) < 1e-5, name


def test_half_precision():
    q, k, v = (torch.nn.functional.silu(_rand(1, 100, 3, 16)).to(HALF) for _ in range(3))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, final = lightning_attention(*xs, RATES, backend="triton")
    out.float().square().sum().backward()
    refs = [x.double().clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_final = lightning_naive(*refs, RATES)
    ref_out.square().sum().backward()
    assert out.dtype == HALF and _rel(out, ref_out) < 5e-3 and _rel(final, ref_final) < 5e-3
    for x, r in zip(xs, refs):
        assert _rel(x.grad, r.grad) < 1e-2


def test_varlen_and_strided_inputs():
    lengths = [5, 0, 65, 1]
    cu = torch.tensor([0, 5, 5, 70, 71], device=DEVICE)
    qkv = _rand(1, sum(lengths), 3, 24)  # q, k, v as views into one packed projection, as the layer makes them
    q, k, v = qkv.split(8, dim=-1)
    states = _rand(4, 3, 8, 8)
    out, finals = lightning_attention(q, k, v, RATES, states, cu_seqlens=cu, backend="triton")
    for i in range(4):
        a, b = cu[i].item(), cu[i + 1].item()
        ref_out, ref_state = lightning_naive(q[:, a:b], k[:, a:b], v[:, a:b], RATES, states[i : i + 1])
        if b > a:
            assert _rel(out[:, a:b], ref_out) < 1e-5
        assert _rel(finals[i : i + 1], ref_state) < 1e-5


def test_decode_and_prefill_into_a_pool():
    pool = _rand(5, 3, 8, 6)
    before = pool.clone()
    q, k, v = _rand(2, 3, 8), _rand(2, 3, 8), _rand(2, 3, 6)
    slots = torch.tensor([3, 0], device=DEVICE)
    out = lightning_decode(q, k, v, RATES, pool, slots, backend="triton")
    for i, slot in enumerate([3, 0]):
        ref, ref_state = lightning_naive(
            q[i, None, None], k[i, None, None], v[i, None, None], RATES, before[slot, None]
        )
        assert _rel(out[i], ref[0, 0]) < 1e-5 and _rel(pool[slot], ref_state[0]) < 1e-5
    assert torch.equal(pool[[1, 2, 4]], before[[1, 2, 4]])
    qp, kp, vp = _rand(1, 13, 3, 8), _rand(1, 13, 3, 8), _rand(1, 13, 3, 6)
    held = pool[1].clone()
    cu, slots = torch.tensor([0, 9, 13], device=DEVICE), torch.tensor([2, 1], device=DEVICE)
    out = lightning_prefill(qp, kp, vp, RATES, cu, pool, slots, torch.tensor([False, True], device=DEVICE), "triton")
    ref1, s1 = lightning_naive(qp[:, 9:], kp[:, 9:], vp[:, 9:], RATES, held[None])
    assert _rel(out[:, 9:], ref1) < 1e-5 and _rel(pool[1], s1[0]) < 1e-5


@slow_in_interpreter
def test_model_forward_on_the_triton_backend_matches_torch():
    from .conftest import tiny_model

    model = tiny_model("tiny-m1").to(DEVICE)
    ids = torch.randint(0, 512, (2, 40), device=DEVICE)
    with torch.no_grad():
        expected = model(ids)
        with use_backend("triton"):
            actual = model(ids)
            generated = mmx.greedy_generate(model, ids[:, :9], 6)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, mmx.greedy_generate(model, ids[:, :9], 6))

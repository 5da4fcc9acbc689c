"""The grouped expert kernel (mmx.ops.expert_rows) against a float64 oracle: float32 and int8 weights (float32 and
bfloat16 scales), every row count of a decode graph that uses it, experts left unused, a NaN kept to its own
token, the same bits at any thread count; and the cases it refuses."""

from __future__ import annotations

import shutil

import pytest
import torch

import mmx.ops.expert_rows as kernel_mod
from mmx.model.linear import FEW_ROWS
from mmx.model.quantization import quantize_rows
from mmx.ops.expert_rows import dense_rows, dense_takes, expert_rows, prepare, supports

needs_cc = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("g++") is None, reason="no C and C++ compilers"
)


def _oracle(x, ids, weights, gate_up, down):
    """Each token's experts one at a time, in float64."""
    x, gate_up, down, weights = x.double(), gate_up.double(), down.double(), weights.double()
    inner = down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            h = gate_up[e] @ x[t]
            out[t] += weights[t, slot] * (down[e] @ (torch.nn.functional.silu(h[:inner]) * h[inner:]))
    return out


def _routing(n: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(n)])
    return ids, torch.rand(n, k, generator=gen)


def _experts(experts: int, hidden: int, inner: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(experts, 2 * inner, hidden, generator=gen) * 0.1,
        torch.randn(experts, hidden, inner, generator=gen) * 0.1,
    )


@needs_cc
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, FEW_ROWS])
def test_float32_experts_match_float64(rows):
    gate_up, down = _experts(6, 64, 96)
    ids, weights = _routing(rows, 6, 3, seed=rows)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    out = expert_rows(x, ids, weights, gate_up, down)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), _oracle(x, ids, weights, gate_up, down), rtol=0, atol=2e-6)


@needs_cc
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, FEW_ROWS])
def test_int8_experts_match_float64(rows, scale_dtype):
    """int8 weights times their per-row scales, exactly the weights the oracle multiplies by."""
    gate_up, down = _experts(4, 128, 32, seed=1)
    (qg, sg), (qd, sd) = quantize_rows(gate_up, scale_dtype), quantize_rows(down, scale_dtype)
    ids, weights = _routing(rows, 4, 2, seed=rows)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    out = expert_rows(x, ids, weights, qg, qd, sg, sd)
    widened = (qg.double() * sg.double()[..., None], qd.double() * sd.double()[..., None])
    torch.testing.assert_close(out.double(), _oracle(x, ids, weights, *widened), rtol=0, atol=2e-6)


@needs_cc
def test_unused_experts_and_a_nan_stay_out_of_other_tokens():
    """Two tokens on experts {0, 1} and {2, 3} of 8: the NaN in the second stays there, experts 4-7 are never
    read (NaN weights there change nothing)."""
    gate_up, down = _experts(8, 32, 48)
    gate_up[4:], down[4:] = float("nan"), float("nan")
    x = torch.randn(2, 32)
    x[1, 5] = float("nan")
    ids, weights = torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    out = expert_rows(x, ids, weights, gate_up, down)
    assert out[0].isfinite().all() and out[1].isnan().all()
    torch.testing.assert_close(
        out[0].double(), _oracle(x[:1], ids[:1], weights[:1], gate_up, down)[0], atol=2e-6, rtol=0
    )


@needs_cc
def test_same_bits_at_any_thread_count():
    gate_up, down = _experts(4, 64, 64)
    ids, weights = _routing(FEW_ROWS, 4, 2, seed=3)
    x = torch.randn(FEW_ROWS, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = expert_rows(x, ids, weights, gate_up, down)
        torch.set_num_threads(max(2, threads))
        more = expert_rows(x, ids, weights, gate_up, down)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, more)


@needs_cc
def test_refuses_what_it_does_not_compute(monkeypatch):
    """Only float32 activations, float32 weights (any rows) or int8 with scales (two rows or more), dimensions in
    whole vectors; and nothing when turned off."""
    gate_up, down = _experts(4, 64, 64)
    x = torch.randn(2, 64)
    assert prepare() and supports(x, gate_up, down) and supports(x[:1], gate_up, down)
    (qg, sg), (qd, _) = quantize_rows(gate_up, torch.float32), quantize_rows(down, torch.float32)
    assert supports(x, qg, qd, sg) and not supports(x[:1], qg, qd, sg)
    assert not supports(x.bfloat16(), gate_up, down)
    assert not supports(x, gate_up.bfloat16(), down.bfloat16())
    assert not supports(x, gate_up.to(torch.int8), down.to(torch.int8))  # int8 without its scales
    odd_gate_up, odd_down = _experts(4, 64, 40)
    assert not supports(x, odd_gate_up, odd_down)
    monkeypatch.setenv("MMX_EXPERT_ROWS", "0")
    assert not prepare() and not supports(x, gate_up, down)
    monkeypatch.delenv("MMX_EXPERT_ROWS")
    assert prepare()


@needs_cc
def test_the_op_names_what_it_cannot_take():
    """The op's own checks (in C++), raised as ValueErrors before the kernel touches anything."""
    gate_up, down = _experts(2, 64, 64)
    ids, weights = torch.tensor([[0], [1]]), torch.ones(2, 1)
    with pytest.raises(ValueError, match=r"rows must be float32 \[N, D\], got BFloat16 \[2, 64\]"):
        expert_rows(torch.randn(2, 64).bfloat16(), ids, weights, gate_up, down)
    with pytest.raises(ValueError, match="expert ids must be int64"):
        expert_rows(torch.randn(2, 64), ids.int(), weights, gate_up, down)
    with pytest.raises(ValueError, match="both scales"):
        expert_rows(torch.randn(2, 64), ids, weights, gate_up.to(torch.int8), down.to(torch.int8))
    with pytest.raises(ValueError, match="both scales"):  # scales with float32 weights
        expert_rows(torch.randn(2, 64), ids, weights, gate_up, down, torch.ones(2, 128), torch.ones(2, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        expert_rows(torch.randn(2, 40), ids, weights, *_experts(2, 40, 64))
    with pytest.raises(ValueError, match=r"routing weights .* got Float \[2\]"):
        expert_rows(torch.randn(2, 64), ids, torch.ones(2), gate_up, down)
    with pytest.raises(ValueError, match=r"gate\|up must be \[E, 2I, D\]"):
        expert_rows(torch.randn(2, 64), ids, weights, gate_up[:, :100], down)
    (qg, sg), (qd, sd) = quantize_rows(gate_up, torch.float32), quantize_rows(down, torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        expert_rows(torch.randn(2, 64), ids, weights, qg, qd, sg, sd)
    with pytest.raises(ValueError, match="one dtype"):  # a scale of the wrong shape
        expert_rows(torch.randn(2, 64), ids, weights, qg, qd, sg, sg)
    for bad in (-1, 2):  # expert ids out of range are refused before any memory is touched
        with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
            expert_rows(torch.randn(2, 64), torch.tensor([[0], [bad]]), weights, gate_up, down)
    with pytest.raises(ValueError, match="threads must be 1 or more"):
        torch.ops.mmx.expert_rows(torch.randn(2, 64), ids, weights, gate_up, down, None, None, 0)


@needs_cc
def test_strided_inputs_are_read_as_their_values():
    """Views that are not contiguous (a transposed weight, a column slice of the rows) give the same result."""
    gate_up, down = _experts(3, 32, 48)
    ids, weights = _routing(4, 3, 2, seed=5)
    wide = torch.randn(4, 64)
    x = wide[:, ::2]
    down_t = down.transpose(1, 2).contiguous().transpose(1, 2)
    out = expert_rows(x, ids, weights, gate_up, down_t)
    torch.testing.assert_close(out.double(), _oracle(x, ids, weights, gate_up, down), rtol=0, atol=2e-6)


def test_without_a_compiler_it_says_why_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernel_mod, "_loaded", None)
    monkeypatch.setattr(kernel_mod, "_failed", None)
    monkeypatch.setenv("MMX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernel_mod, "_active", True)  # restored after the test
    with caplog.at_level("WARNING"):
        assert not kernel_mod.library()
        assert not prepare()
    assert sum("grouped expert kernel unavailable" in r.getMessage() for r in caplog.records) == 1
    assert not supports(torch.randn(2, 64), *_experts(2, 64, 64))
    with pytest.raises(RuntimeError, match="unavailable"):
        expert_rows(torch.randn(1, 64), torch.tensor([[0]]), torch.ones(1, 1), *_experts(2, 64, 64))


@needs_cc
@pytest.mark.parametrize("rows", [2, 3, 5, 8, FEW_ROWS])
def test_dense_rows_match_float64(rows):
    """A few rows times a float32 weight [O, D]: every row count of the "few" graph, leading dimensions kept."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(36, 48, generator=gen)
    x = torch.randn(rows, 1, 48, generator=gen)
    out = dense_rows(x, weight)
    assert out.shape == (rows, 1, 36) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), x.double() @ weight.double().T, rtol=0, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_dense_rows_match_float64(scale_dtype):
    """int8 weights times their per-row scales, exactly the weights the oracle multiplies by."""
    gen = torch.Generator().manual_seed(3)
    weight, scale = quantize_rows(torch.randn(36, 48, generator=gen), scale_dtype)
    x = torch.randn(FEW_ROWS - 3, 48, generator=gen)
    widened = weight.double() * scale.double()[:, None]
    torch.testing.assert_close(dense_rows(x, weight, scale).double(), x.double() @ widened.T, rtol=0, atol=1e-5)


@needs_cc
def test_dense_rows_take_and_refuse():
    weight = torch.randn(36, 48)
    assert prepare() and dense_takes(torch.randn(4, 48), weight)
    assert not dense_takes(torch.randn(1, 48), weight)  # one row: the dot products stream the weight already
    assert not dense_takes(torch.randn(FEW_ROWS + 1, 48), weight)
    assert not dense_takes(torch.randn(4, 48).bfloat16(), weight.bfloat16())
    assert not dense_takes(torch.randn(4, 40), torch.randn(36, 40))  # D not a multiple of 16
    assert not dense_takes(torch.randn(4, 48), torch.randn(34, 48))  # O not a multiple of 4
    with pytest.raises(ValueError, match=r"mmx::dense_rows: .* got BFloat16 \[2, 48\]"):
        dense_rows(torch.randn(2, 48).bfloat16(), weight)
    with pytest.raises(ValueError, match="O of 4"):
        dense_rows(torch.randn(2, 48), torch.randn(34, 48))
    quantized, _ = quantize_rows(weight, torch.float32)
    with pytest.raises(ValueError, match="takes its scale"):
        dense_rows(torch.randn(2, 48), quantized)
    with pytest.raises(ValueError, match=r"scale must be .* got Float \[35\]"):
        dense_rows(torch.randn(2, 48), quantized, torch.ones(35))

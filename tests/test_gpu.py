"""GPU-only checks (pytest -m gpu on a CUDA machine): bf16 Triton kernels at real sizes, and that CUDA tensors
pick the Triton backend automatically."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("h, d, t", [(8, 128, 4096), (64, 128, 2048), (16, 64, 5000)])
def test_bf16_triton_against_the_torch_path_in_float32(h, d, t):
    pytest.importorskip("triton")
    from mmx.ops import decay_rates, lightning_attention

    rates = decay_rates(h, 3, 80).cuda()
    q, k, v = (torch.nn.functional.silu(torch.randn(1, t, h, d, device="cuda")) for _ in range(3))
    ref_out, ref_state = lightning_attention(q, k, v, rates, backend="torch")  # float32, chunked
    xs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out, state = lightning_attention(*xs, rates)  # auto: Triton on CUDA
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-2 and _rel(state, ref_state) < 1e-2
    out.float().sum().backward()
    refs = [x.detach().float().requires_grad_() for x in xs]
    lightning_attention(*refs, rates, backend="torch")[0].sum().backward()
    for x, r in zip(xs, refs):
        assert _rel(x.grad, r.grad) < 2e-2


def test_cuda_tensors_use_triton():
    pytest.importorskip("triton")
    from mmx.ops.lightning import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"

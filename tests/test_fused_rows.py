"""The one-pass kernels of eager float32 forwards (mmx.ops.fused_rows) against float64 oracles: RMSNorm, QK-norm
with partial rotary, silu(gate) * up, causal attention at any offset; the same bits at any thread count; the tensors
they refuse; and a model's forward taking them, as near a float64 forward as the torch ops."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from mmx.model.rotary import RotaryEmbedding
from mmx.ops import fused_rows

from .conftest import tiny_model

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("g++") is None, reason="no compilers")


@pytest.fixture(autouse=True)
def _loaded_again(monkeypatch):
    """Each test reads MMX_FUSED_ROWS afresh, and leaves the module as it found it."""
    fused_rows.reset()
    yield
    monkeypatch.delenv("MMX_FUSED_ROWS", raising=False)
    fused_rows.reset()


def _rms64(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


def _rotary64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """NeoX rotary of x [rows, heads * head_dim] (float64) on the first rotary_dim channels of each head."""
    rows, rd = x.shape[0], cos.shape[-1]
    h = x.reshape(rows, heads, -1).clone()
    half = rd // 2
    a, b = h[..., :half].clone(), h[..., half:rd].clone()
    c, s = cos.double()[:, None], sin.double()[:, None]
    h[..., :half] = a * c[..., :half] - b * s[..., :half]
    h[..., half:rd] = b * c[..., half:] + a * s[..., half:]
    return h.reshape(rows, -1)


@pytest.mark.parametrize("rows, n", [(1, 16), (3, 48), (5000, 256), (7, 1024)])
def test_rms_norm_matches_float64(rows, n):
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, n, generator=gen) * 3, torch.rand(n, generator=gen) + 0.5
    assert fused_rows.takes(x, w)
    out = fused_rows.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out.double(), _rms64(x, w, 1e-6), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "heads, head_dim, rotary_dim, normed", [(4, 64, 32, True), (2, 128, 64, False), (3, 32, 32, True)]
)
def test_norm_rotary_matches_float64(heads, head_dim, rotary_dim, normed):
    gen = torch.Generator().manual_seed(heads)
    rows = 300
    x = torch.randn(1, rows, heads * head_dim, generator=gen)
    w = torch.rand(heads * head_dim, generator=gen) + 0.5 if normed else None
    cos, sin = RotaryEmbedding(rotary_dim, 5e6)(torch.arange(rows)[None] * 37)
    assert fused_rows.takes(x, w, cos, sin)
    out = fused_rows.norm_rotary(x, w, 1e-6, cos, sin, heads)
    normed64 = _rms64(x[0], w, 1e-6) if normed else x[0].double()
    torch.testing.assert_close(out[0].double(), _rotary64(normed64, cos[0], sin[0], heads), rtol=2e-6, atol=2e-6)


def test_norm_rotary_refuses_cos_of_another_length():
    x = torch.randn(10, 64)
    cos, sin = RotaryEmbedding(32, 1e4)(torch.arange(9))
    with pytest.raises(ValueError, match="one row per row"):
        fused_rows.norm_rotary(x, None, 1e-6, cos, sin, 1)


@pytest.mark.parametrize("rows, inner", [(1, 16), (1000, 512), (33, 48)])
def test_silu_mul_matches_float64(rows, inner):
    gate_up = torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(inner)) * 4
    out = fused_rows.silu_mul(gate_up)
    g, u = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(out.double(), F.silu(g) * u, rtol=4e-7, atol=1e-6)


def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4096, 256, generator=gen), torch.rand(256, generator=gen)
    cos, sin = RotaryEmbedding(32, 5e6)(torch.arange(4096))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                (
                    fused_rows.rms_norm(x, w, 1e-6),
                    fused_rows.norm_rotary(x, w, 1e-6, cos, sin, 4),
                    fused_rows.silu_mul(x),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_tensors_the_kernels_refuse(monkeypatch):
    x = torch.randn(8, 64)
    assert fused_rows.takes(x, None)
    assert not fused_rows.takes(x.bfloat16())
    assert not fused_rows.takes(x.t())  # not contiguous
    assert not fused_rows.takes(x.double())
    assert not fused_rows.takes(x.requires_grad_())  # autograd records it: the torch ops, which it differentiates
    with torch.no_grad():
        assert fused_rows.takes(x)
    monkeypatch.setenv("MMX_FUSED_ROWS", "0")
    fused_rows.reset()
    assert not fused_rows.takes(torch.randn(8, 64))
    monkeypatch.setenv("MMX_FUSED_ROWS", "off")
    fused_rows.reset()
    with pytest.raises(ValueError, match="MMX_FUSED_ROWS='off'"):
        fused_rows.takes(torch.randn(8, 64))


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
def test_a_forward_takes_the_kernels_and_equals_the_torch_ops(preset, monkeypatch):
    model = tiny_model(preset)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    calls: list[str] = []
    for name in ("rms_norm", "norm_rotary", "silu_mul", "attention"):
        real = getattr(fused_rows, name)
        monkeypatch.setattr(fused_rows, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    with torch.inference_mode():
        fused = model(ids)
    assert {"rms_norm", "norm_rotary", "attention"} <= set(calls)
    assert "silu_mul" in calls or model.config.hidden_act != "silu"
    monkeypatch.setenv("MMX_FUSED_ROWS", "0")
    fused_rows.reset()
    calls.clear()
    with torch.inference_mode():
        plain = model(ids)
    assert calls == []
    # both as near a float64 forward (the torch ops) as each other: the kernels round differently, not worse
    with torch.inference_mode():
        exact = model.double()(ids)
    model.float()
    fused_error, plain_error = ((out.double() - exact).abs().max().item() for out in (fused, plain))
    assert fused_error < 1e-4 and fused_error < 2 * plain_error, (fused_error, plain_error)
    # training: autograd records the forward, so the torch ops run (with the kernels on) and gradients flow
    monkeypatch.delenv("MMX_FUSED_ROWS")
    fused_rows.reset()
    model(ids).float().logsumexp(-1).mean().backward()
    assert calls == [] and model.model.norm.weight.grad is not None


def _attention64(q, k, v, scale, offset):
    """Dense float64 attention, query i seeing keys j <= offset + i (offset None: every key)."""
    t, s = q.shape[2], k.shape[2]
    mask = None if offset is None else torch.arange(s)[None, :] <= torch.arange(t)[:, None] + offset
    return F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@pytest.mark.parametrize(
    "batch, heads, kv_heads, t, keys, offset, d",
    [
        (1, 4, 2, 600, 1500, 900, 64),  # a chunk after 900 cached keys
        (3, 4, 2, 130, 130, 0, 64),  # fresh prompts side by side, causal
        (2, 6, 1, 70, 200, None, 128),  # every key visible
        (1, 2, 2, 5, 40, 20, 48),  # keys past the last query's position are never seen; 3 vectors a head
        (1, 3, 3, 1, 77, 76, 16),
    ],
)
def test_attention_matches_float64(batch, heads, kv_heads, t, keys, offset, d):
    """The one-pass attention kernel (online softmax over blocks of 64 keys) against dense float64 attention, with
    the strides the model hands it (heads split off the [B, T, H * D] projections), at any thread count; its output
    laid out [B, T, H, D] as the output projection reads it."""
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(batch, t, heads, d, generator=gen).transpose(1, 2)
    k, v = (torch.randn(batch, keys, kv_heads, d, generator=gen).transpose(1, 2) for _ in range(2))
    assert fused_rows.takes_attention(q, k, v)
    scale = d**-0.5
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(fused_rows.attention(q, k, v, scale, offset))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert outs[0].transpose(1, 2).is_contiguous()
    torch.testing.assert_close(outs[0].double(), _attention64(q, k, v, scale, offset), rtol=1e-5, atol=2e-6)


def test_a_chunk_after_cached_keys_equals_the_whole_prompt_bit_for_bit():
    """Each row is computed alone in a fixed order over the same key blocks: the second half of a prompt attended
    after its cached first half gives the bits of the whole prompt's attention (prefix caching changes nothing)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 64, generator=gen)
    k, v = (torch.randn(1, 2, 300, 64, generator=gen) for _ in range(2))
    whole = fused_rows.attention(q, k, v, 0.125, 0)
    second = fused_rows.attention(q[:, :, 170:], k, v, 0.125, 170)
    assert torch.equal(second, whole[:, :, 170:])


def test_attention_refuses_what_it_cannot_read():
    q, k = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 8, 64)
    assert not fused_rows.takes_attention(q, k, torch.randn(1, 2, 9, 64))  # K and V of different lengths
    assert not fused_rows.takes_attention(torch.randn(1, 3, 8, 64), k, k)  # 3 query heads on 2 K/V heads
    assert not fused_rows.takes_attention(q[..., :40], k[..., :40], k[..., :40])  # 40 channels
    assert not fused_rows.takes_attention(q.transpose(2, 3), k, k)  # channels not contiguous
    assert not fused_rows.takes_attention(q.double(), k.double(), k.double())
    assert not fused_rows.takes_attention(q, k[..., :48], k[..., :48])  # head sizes differ
    assert not fused_rows.takes_attention(q, torch.randn(2, 2, 8, 64), torch.randn(2, 2, 8, 64))  # batches differ
    with pytest.raises(ValueError, match="refused"):
        fused_rows.attention(q, k, torch.randn(1, 2, 9, 64), 0.1, 0)
    cos, sin = RotaryEmbedding(80, 1e4)(torch.arange(8))
    with pytest.raises(ValueError, match="rotary on 80 channels"):  # more than a head's 64
        fused_rows.norm_rotary(torch.randn(8, 128), None, 1e-6, cos, sin, 2)

"""The oneDNN route for eager float32 products on the CPU (mmx.model.linear.linear): taken only where it pays
and autograd is not recording, equal to a float64 reference to float32 rounding, and the MoE's per-expert loop
through it equal to the grouped GEMM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmx.model.linear as linear_mod
import mmx.model.moe as moe_mod
from mmx.model.linear import ONEDNN_MIN_MACS, linear, onednn_pays
from mmx.model.moe import EXPERTS_ONEDNN_MIN_MACS, combine_per_expert, experts_pay_onednn, grouped_moe, swiglu

needs_onednn = pytest.mark.skipif(not linear_mod.ONEDNN_LINEAR, reason="oneDNN route is off on this CPU")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the inputs oneDNN multiplied (the real call still runs): those of ``onednn_linear``, and the row
    blocks the MoE's experts pass to ``onednn_product`` themselves."""
    calls: list[tuple[int, ...]] = []

    def counting(real):
        def counted(x, weight, bias=None):
            calls.append(tuple(x.shape))
            return real(x, weight, bias)

        return counted

    monkeypatch.setattr(linear_mod, "onednn_linear", counting(linear_mod.onednn_linear))
    monkeypatch.setattr(moe_mod, "onednn_product", counting(moe_mod.onednn_product))
    return calls


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@needs_onednn
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (3, 40, 256)])
def test_large_products_go_through_onednn_and_match_float64(onednn_calls, shape, column_major):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 256, generator=gen)
    if column_major:  # the eager engine's decode layout (mmx.model.layout)
        weight = weight.T.contiguous().T
    bias = torch.randn(1024, generator=gen)
    x = torch.randn(*shape, generator=gen)
    with torch.inference_mode():
        out = linear(x, weight, bias)
    assert onednn_calls == [shape]
    assert out.shape == (*shape[:-1], 1024) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_row_blocks_cover_the_rows_with_few_sizes():
    allowed = set(linear_mod.ROW_SIZES) | {linear_mod.ROW_BLOCK << i for i in range(6)}
    for rows in [*range(1, 1100), 3000, 4096, 8192, 8193, 20000]:
        blocks = linear_mod.row_blocks(rows)
        assert blocks[0][0] == 0 and all(size in allowed for _, size in blocks)
        ends = [start + size for start, size in blocks]
        assert all(end == start for end, (start, _) in zip(ends, blocks[1:]))  # back to back
        assert ends[-1] >= rows and ends[-1] - rows < linear_mod.ROW_BLOCK  # only the last block is padded
        assert all(size >= linear_mod.ROW_BLOCK for _, size in blocks[:-1])
    assert linear_mod.row_blocks(4096) == [(0, 4096)]  # a prefill chunk: one call
    assert linear_mod.row_blocks(700) == [(0, 512), (512, 192)]


@needs_onednn
@pytest.mark.parametrize("rows", [700, 3000])
def test_products_over_several_blocks_match_float64(onednn_calls, rows):
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(512, 256, generator=gen), torch.randn(rows, 256, generator=gen)
    with torch.inference_mode():
        out = linear(x, weight)
    assert onednn_calls == [(rows, 256)] and out.shape == (rows, 512)
    torch.testing.assert_close(out.double(), _reference(x, weight, None), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "why, rows, weight_dtype",
    [
        ("one row", 1, torch.float32),
        ("too small", 2, torch.float32),
        ("small weight", 512, torch.float32),
        ("bf16", 64, torch.bfloat16),
    ],
)
def test_small_or_non_float32_products_stay_with_f_linear(onednn_calls, why, rows, weight_dtype):
    out_features = {"too small": 64, "small weight": 192}.get(why, 1024)
    in_features = 192 if why == "small weight" else 256  # 192 x 192: below ONEDNN_MIN_WEIGHT, at any row count
    weight = torch.randn(out_features, in_features).to(weight_dtype)
    x = torch.randn(rows, in_features).to(weight_dtype)
    assert rows * weight.numel() < ONEDNN_MIN_MACS or why != "too small"
    with torch.inference_mode():
        out = linear(x, weight)
    assert onednn_calls == []
    assert torch.equal(out, F.linear(x, weight))


def test_autograd_keeps_f_linear_and_its_gradients(onednn_calls):
    weight = torch.randn(1024, 256, requires_grad=True)
    x = torch.randn(64, 256, requires_grad=True)
    out = linear(x, weight)
    out.sum().backward()
    assert onednn_calls == []
    assert weight.grad is not None and x.grad is not None
    with torch.no_grad():  # the same product outside autograd may take oneDNN
        assert onednn_pays(x, weight) == linear_mod.ONEDNN_LINEAR


def test_switched_off_by_the_environment_flag(onednn_calls, monkeypatch):
    monkeypatch.setattr(linear_mod, "ONEDNN_LINEAR", False)
    with torch.inference_mode():
        linear(torch.randn(64, 256), torch.randn(1024, 256))
    assert onednn_calls == []


def test_compiled_graphs_keep_their_own_products(onednn_calls):
    weight = torch.randn(1024, 256)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return linear(x, weight)

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for rows in (2, 3, 64, 4096):  # below and above the size oneDNN would take: one graph for all
            x = torch.randn(rows, 256)
            torch._dynamo.mark_dynamic(x, 0)
            f(x)
    assert onednn_calls == []  # inductor lowers mkldnn linear only for frozen weights
    # the size test must not run while tracing: it would guard the graph on the batch size and recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


@needs_onednn
def test_moe_loop_through_onednn_matches_the_grouped_gemm_and_float64(onednn_calls):
    gen = torch.Generator().manual_seed(1)
    experts, hidden, width, tokens, k = 4, 256, 1024, 64, 2
    gate_up = torch.randn(experts, 2 * width, hidden, generator=gen) * 0.05
    down = torch.randn(experts, hidden, width, generator=gen) * 0.05
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    mix = torch.rand(tokens, k, generator=gen)
    with torch.inference_mode():
        assert experts_pay_onednn(x, ids, experts, gate_up[0].numel())
        assert not experts_pay_onednn(x[:4], ids[:4], experts, gate_up[0].numel())  # 2 rows an expert: too few
        looped = combine_per_expert(x, ids, mix, experts, lambda e, r: swiglu(r, gate_up[e], down[e], F.silu))
        grouped = grouped_moe(x, ids, mix, gate_up, down, F.silu)
    assert len(onednn_calls) == 2 * experts  # gate|up and down of every expert
    assert tokens * k // experts * gate_up[0].numel() >= EXPERTS_ONEDNN_MIN_MACS
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for slot in range(k):
            e = int(ids[t, slot])
            g, u = (gate_up[e].double() @ x[t].double()).chunk(2)
            expected[t] += mix[t, slot].double() * (down[e].double() @ (F.silu(g) * u))
    torch.testing.assert_close(looped.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(looped, grouped, rtol=1e-5, atol=1e-5)


def test_warm_up_builds_a_kernel_per_weight_shape_and_row_size(monkeypatch):
    from mmx.model.layout import warm_onednn

    from .conftest import tiny_model

    model = tiny_model("tiny-m2")
    monkeypatch.setattr(linear_mod, "ONEDNN_LINEAR", True)
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_MACS", 1)  # every size of every shape
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_WEIGHT", 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    built = warm_onednn(model)
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    experts = model.model.layers[0].mlp.experts
    shapes |= {tuple(experts.gate_up_proj.shape[1:]), tuple(experts.down_proj.shape[1:])}
    assert built == len(shapes) * len(linear_mod.ROW_SIZES)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

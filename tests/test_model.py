"""The model as a whole: shapes, caches (prefill + decode == one forward), generation, dtypes, presets."""

from __future__ import annotations

import pytest
import torch

import mmx
from mmx import DenseCache, MiniMaxConfig, MiniMaxForCausalLM
from mmx.model.generate import greedy_generate_recompute

from .conftest import assert_logits_close, tiny_model

L, S = "linear_attention", "full_attention"
LAYOUTS = {
    "m1-lightning-first": dict(preset="tiny-m1"),
    "m1-softmax-first": dict(preset="tiny-m1", layer_types=[S, L, L, S], block_size=5),
    "m2": dict(preset="tiny-m2"),
}


def _model(name: str) -> MiniMaxForCausalLM:
    spec = dict(LAYOUTS[name])
    return tiny_model(spec.pop("preset"), **spec)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_prefill_then_decode_equals_one_forward(name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache()
        pieces = [model(ids[:, :11], cache=cache), model(ids[:, 11:20], cache=cache)]  # chunked prefill
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(20, 30)]  # decode steps
    assert cache.length == 30
    assert_logits_close(torch.cat(pieces, dim=1), full, rel=1e-5)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_greedy_equals_full_recompute(name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    assert torch.equal(mmx.greedy_generate(model, ids, 24), greedy_generate_recompute(model, ids, 24))


def test_forward_shapes_positions_and_dtypes():
    model = tiny_model("tiny-m1")
    ids = torch.randint(0, 512, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 512) and logits.dtype == torch.float32
    torch.testing.assert_close(model(ids, positions=torch.arange(7)), logits, rtol=0, atol=0)
    shifted = model(ids, positions=torch.arange(7) + 100)  # only softmax layers see positions
    assert not torch.allclose(shifted, logits)


def test_bf16_model_tracks_float32():
    """With a realistic init (std 0.02), bf16 weights and activations (float32 router, norms and lightning state)
    stay close to float32: discrete routing flips aside, the next-token choice rarely changes."""
    config = MiniMaxConfig.from_preset("tiny-m1")
    fp32 = MiniMaxForCausalLM(config).init_weights(seed=1)
    bf16 = MiniMaxForCausalLM(config).init_weights(seed=1).cast(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        expected, actual = fp32(ids), bf16(ids)
    assert actual.dtype == torch.float32
    assert ((actual - expected).abs().mean() / expected.abs().mean()).item() < 0.03
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backward_through_the_model_matches_autograd_reference(name):
    """Parameter gradients with the chunked lightning backward equal those of plain autograd through the
    reference blocked form."""
    from mmx.ops.lightning import use_backend

    ids = torch.randint(0, 512, (2, 45))

    def grads(backend):
        model = _model(name).train()
        with use_backend(backend):
            model(ids).logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    fast, reference = grads("torch"), grads("reference")
    for n, g in reference.items():
        assert g is not None and fast[n] is not None, n
        torch.testing.assert_close(fast[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for n, g in fast.items() if "qkv_proj" in n) or name == "m2"


def test_bad_token_ids_are_explained():
    model = tiny_model("tiny-m2")
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 2))


def test_greedy_stops_rows_at_eos():
    model = tiny_model("tiny-m1")
    ids = torch.randint(0, 512, (2, 5))
    free = mmx.greedy_generate(model, ids, 6)
    eos = int(free[0, 2])
    out = mmx.greedy_generate(model, ids, 6, eos_token_ids=[eos])
    assert torch.equal(out[0, :3], free[0, :3]) and (out[0, 3:] == eos).all()


def test_tied_embeddings_survive_save_and_load(tmp_path):
    model = tiny_model("tiny-m1", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = mmx.load_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (1, 9))
    torch.testing.assert_close(loaded(ids), model(ids))


@pytest.mark.parametrize(
    "name, total, active",
    [
        ("minimax-m1-80k", 456_089_655_296, 45_944_920_064),
        ("minimax-m1-40k", 456_089_655_296, 45_944_920_064),
        ("minimax-text-01", 456_089_655_296, 45_944_920_064),
        ("minimax-m2", 228_689_764_864, 9_801_359_872),
    ],
)
def test_full_size_presets_on_meta(name, total, active):
    """M1: 456B / 45.9B (published); M2: 228.7B total and 9.80B active without embeddings ("230B / 10B")."""
    with torch.device("meta"):
        model = MiniMaxForCausalLM(MiniMaxConfig.from_preset(name))
    counts = model.parameter_counts()
    assert counts["total"] == total and counts["active"] == active
    published = {"minimax-m2": (230e9, 10e9)}.get(name, (456e9, 45.9e9))
    assert abs(counts["total"] / published[0] - 1) < 0.01
    assert abs(counts["active"] / published[1] - 1) < 0.02  # M2's "10B" rounds 9.80B

"""Parity with transformers 5.23 (MiniMaxForCausalLM, MiniMaxM2ForCausalLM) on tiny random configs, in both
directions: transformers saves and mmx loads, mmx saves and transformers loads. Logits agree to 1e-4 of the
logit scale and 32-token greedy continuations are identical."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmx  # noqa: E402
from mmx import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402

from .conftest import assert_logits_close, randomize  # noqa: E402

L, S = "linear_attention", "full_attention"
SEQ = 23  # not a multiple of any block size below
COMMON = dict(vocab_size=97, intermediate_size=24, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)

# Each case: head counts that are not powers of two, head_dim != hidden / heads, GQA ratios 1, 2 and 4, a
# softmax or lightning first layer, alpha / beta != 1, top-k from 1 to 4.
M1_CASES = {
    "lightning-first_h3_gqa1_top1": dict(
        layer_types=[L, L, S, L],
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=16,
        hidden_size=40,
        num_local_experts=4,
        num_experts_per_tok=1,
        block_size=4,
        full_attn_alpha_factor=1.7,
        full_attn_beta_factor=0.9,
        linear_attn_alpha_factor=2.1,
        linear_attn_beta_factor=1.1,
        mlp_alpha_factor=1.3,
        mlp_beta_factor=0.8,
    ),
    "softmax-first_h4_gqa2_top2": dict(
        layer_types=[S, L, L],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=3,
        full_attn_alpha_factor=3.5565588200778455,
        linear_attn_alpha_factor=3.5565588200778455,
        mlp_alpha_factor=3.5565588200778455,
    ),
    "h8_gqa4_top4": dict(
        layer_types=[L, S],
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=12,
        hidden_size=64,
        num_local_experts=6,
        num_experts_per_tok=4,
        block_size=5,
        mlp_beta_factor=0.5,
    ),
    "h6_gqa2_top3_gelu": dict(
        layer_types=[L, L, L, S, L],
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        hidden_size=32,
        num_local_experts=5,
        num_experts_per_tok=3,
        block_size=7,
        hidden_act="gelu",
        linear_attn_beta_factor=1.4,
    ),
}

M2_CASES = {
    "gqa1_top1_h3": dict(
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=16,
        hidden_size=40,
        rotary=8,
        num_local_experts=4,
        num_experts_per_tok=1,
    ),
    "gqa2_top2": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_size=40,
        rotary=4,
        num_local_experts=6,
        num_experts_per_tok=2,
    ),
    "gqa4_top4_full-rotary": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        hidden_size=32,
        rotary=8,
        num_local_experts=8,
        num_experts_per_tok=4,
    ),
    "gqa2_top3_h6": dict(
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        hidden_size=48,
        rotary=8,
        num_local_experts=5,
        num_experts_per_tok=3,
    ),
}


def _m1_kwargs(case: dict) -> dict:
    return dict(
        COMMON,
        num_hidden_layers=len(case["layer_types"]),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **case,
    )


def _m2_kwargs(case: dict) -> dict:
    case = dict(case)
    rotary = case.pop("rotary")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary / case["head_dim"]}
    return dict(COMMON, num_hidden_layers=3, rms_norm_eps=1e-6, rope_parameters=rope, **case)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def _compare(ours: MiniMaxForCausalLM, theirs, ids: torch.Tensor) -> None:
    with torch.no_grad():
        expected = theirs(ids).logits
        actual = ours(ids)
    assert expected.abs().max() > 1.0  # logits far enough from zero to discriminate
    assert_logits_close(actual, expected, rel=1e-4)
    assert torch.equal(mmx.greedy_generate(ours, ids, 32), _hf_greedy(theirs, ids, 32))


def _hf_m1(kwargs: dict, seed: int):
    model = transformers.MiniMaxForCausalLM(transformers.MiniMaxConfig(**kwargs))
    return randomize(model, seed=seed).eval()


def _hf_m2(kwargs: dict, seed: int):
    model = transformers.MiniMaxM2ForCausalLM(transformers.MiniMaxM2Config(**kwargs))
    return randomize(model, seed=seed, bias_scale=0.5).eval()


@pytest.mark.parametrize("case", list(M1_CASES))
def test_m1_transformers_to_mmx(case, tmp_path):
    hf = _hf_m1(_m1_kwargs(M1_CASES[case]), seed=3)
    hf.save_pretrained(tmp_path)
    ours = mmx.load_model(tmp_path)
    assert ours.config.layer_types == M1_CASES[case]["layer_types"]
    _compare(ours, hf, _ids())


@pytest.mark.parametrize("case", list(M1_CASES))
def test_m1_mmx_to_transformers(case, tmp_path):
    config = MiniMaxConfig.from_dict({"model_type": "minimax", **_m1_kwargs(M1_CASES[case])})
    ours = randomize(MiniMaxForCausalLM(config), seed=4).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MiniMaxForCausalLM"
    _compare(ours, hf, _ids(2))


@pytest.mark.parametrize("case", list(M2_CASES))
def test_m2_transformers_to_mmx(case, tmp_path):
    hf = _hf_m2(_m2_kwargs(M2_CASES[case]), seed=5)
    hf.save_pretrained(tmp_path)
    ours = mmx.load_model(tmp_path)
    assert ours.config.use_qk_norm and ours.config.scoring_func == "sigmoid"
    assert ours.config.rotary_dim == M2_CASES[case]["rotary"]
    _compare(ours, hf, _ids(3))
    # The routing bias is live in this comparison: without it the logits move far past the tolerance.
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.mlp.e_score_correction_bias.zero_()
        unbiased, expected = ours(_ids(3)), hf(_ids(3)).logits
    assert (unbiased - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("case", list(M2_CASES))
def test_m2_mmx_to_transformers(case, tmp_path):
    config = MiniMaxConfig.from_dict({"model_type": "minimax_m2", **_m2_kwargs(M2_CASES[case])})
    ours = randomize(MiniMaxForCausalLM(config), seed=6, bias_scale=0.5).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MiniMaxM2ForCausalLM"
    assert hf.model.layers[0].mlp.e_score_correction_bias.abs().sum() > 0
    _compare(ours, hf, _ids(4))

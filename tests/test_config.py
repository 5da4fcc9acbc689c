"""MiniMaxConfig: the three checkpoint dialects, presets, round trips, and errors that name the key."""

from __future__ import annotations

import json
import logging

import pytest

from mmx import ConfigError, MiniMaxConfig
from mmx.presets import PRESETS, preset_dict

L, S = "linear_attention", "full_attention"


def test_official_m1_config_reads_as_the_remote_code_does():
    c = MiniMaxConfig.from_preset("minimax-m1-80k")
    assert c.dialect == "official" and c.architecture == "minimax_m1"
    assert [i for i, t in enumerate(c.layer_types) if t == S] == [7, 15, 23, 31, 39, 47, 55, 63, 71, 79]
    assert c.postnorm and c.rotary_dim == 64 and c.head_dim == 128 and c.rope_theta == 1e7
    assert c.linear_attn_alpha_factor == pytest.approx(3.5565588200778455) and c.mlp_beta_factor == 1.0
    assert c.lightning_slopes == "official" and c.block_size == 256 and c.scoring_func == "softmax"
    assert not c.use_qk_norm and not c.use_routing_bias


def test_official_defaults_for_absent_keys():
    """The remote code's getattr fallbacks: postnorm False, alpha/beta 1, rotary_dim = head_dim = hidden/heads."""
    c = MiniMaxConfig.from_dict(
        {
            "model_type": "minimax_m1",
            "attn_type_list": [0, 1],
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 32,
            "vocab_size": 100,
            "num_local_experts": 4,
        }
    )
    assert not c.postnorm and c.head_dim == 16 and c.rotary_dim == 16 and c.mlp_alpha_factor == 1.0
    assert c.num_key_value_heads == 4 and c.num_experts_per_tok == 2 and c.max_position_embeddings == 131072


def test_transformers_dialect_matches_official_dialect():
    official = MiniMaxConfig.from_preset("minimax-m1-80k")
    native = MiniMaxConfig.from_dict(official.to_dict("transformers"))
    assert native.dialect == "transformers"
    for field in (
        "layer_types",
        "rotary_dim",
        "rope_theta",
        "postnorm",
        "mlp_alpha_factor",
        "head_dim",
        "block_size",
    ):
        assert getattr(native, field) == getattr(official, field), field
    # The official schedule survives the trip through a transformers-dialect file.
    assert native.lightning_slopes == "official"
    assert MiniMaxConfig.from_dict(official.to_dict("official")) == official


def test_transformers_dialect_defaults():
    c = MiniMaxConfig.from_dict(
        {
            "model_type": "minimax",
            "num_hidden_layers": 3,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "vocab_size": 100,
            "num_experts": 4,  # the alias transformers also reads
        }
    )
    assert c.num_local_experts == 4
    assert c.layer_types == [S, L, S]  # transformers' alternating default, starting with softmax
    assert c.postnorm and c.lightning_slopes == "transformers" and c.rope_theta == 1e6 and c.rotary_dim == 16


def test_partial_rotary_from_either_key_and_contradiction():
    base = {
        "model_type": "minimax",
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "head_dim": 32,
        "vocab_size": 100,
        "num_local_experts": 2,
    }
    with_factor = MiniMaxConfig.from_dict(
        {**base, "rope_parameters": {"rope_theta": 5.0, "partial_rotary_factor": 0.5}}
    )
    with_dim = MiniMaxConfig.from_dict({**base, "rotary_dim": 16})
    assert with_factor.rotary_dim == with_dim.rotary_dim == 16 and with_factor.rope_theta == 5.0
    with pytest.raises(ConfigError) as e:
        MiniMaxConfig.from_dict({**base, "rotary_dim": 8, "rope_parameters": {"partial_rotary_factor": 0.5}})
    assert e.value.key == "rotary_dim"


def test_hf_internal_testing_tiny_config_quirks(caplog):
    """hf-internal-testing/tiny-random-MiniMaxForCausalLM carries a legacy rope_theta that disagrees with
    rope_parameters and a rotary_dim larger than its heads; transformers uses rope_parameters and the whole head."""
    data = {
        "model_type": "minimax",
        "layer_types": [L, L],
        "block_size": 64,
        "head_dim": 16,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "vocab_size": 200064,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "rope_theta": 10000000,
        "rotary_dim": 64,
        "postnorm": True,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "full_attn_alpha_factor": 3.5565588200778455,
        "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": 3.5565588200778455,
        "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": 3.5565588200778455,
        "mlp_beta_factor": 1.0,
    }
    with caplog.at_level(logging.WARNING, logger="mmx"):
        c = MiniMaxConfig.from_dict(data)
    assert c.rope_theta == 1e6 and c.rotary_dim == 16 and c.block_size == 64
    assert "rope_theta" in caplog.text and "rotary_dim" in caplog.text


def test_m2_config():
    c = MiniMaxConfig.from_preset("minimax-m2")
    assert c.architecture == "minimax_m2" and c.layer_types == [S] * 62
    assert c.use_qk_norm and c.qk_norm_type == "per_layer" and c.scoring_func == "sigmoid" and c.use_routing_bias
    assert c.rotary_dim == 64 and c.rope_theta == 5e6 and not c.postnorm and c.rms_norm_eps == 1e-6
    assert c.use_mtp and c.num_mtp_modules == 3 and c.mtp_transformer_layers == 1
    assert c.mlp_alpha_factor == 1.0 and c.full_attn_beta_factor == 1.0
    again = MiniMaxConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again.replace(dialect=c.dialect) == c


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips(name):
    c = MiniMaxConfig.from_preset(name)
    for dialect in ("official", "transformers"):
        again = MiniMaxConfig.from_dict(c.to_dict(dialect))
        assert again.replace(dialect=c.dialect) == c, dialect


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attn_type_list": [0, 2, 0, 1]}, "attn_type_list"),
        ({"attn_type_list": [0, 1]}, "attn_type_list"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rotary_dim": 15}, "rotary_dim"),
        ({"rotary_dim": 64}, "rotary_dim"),
        ({"hidden_act": "swish2"}, "hidden_act"),
        ({"shared_intermediate_size": 128}, "shared_intermediate_size"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"layer_types": ["linear_attention"] * 4}, "attn_type_list"),
        ({"layernorm_mlp_alpha": 2.0, "mlp_alpha_factor": 3.0}, "layernorm_mlp_alpha"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type"),
        ({"num_local_experts": 4, "num_experts": 8}, "num_experts"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_bad_values_name_the_key(change, key):
    data = {**preset_dict("tiny-m1"), **change}
    with pytest.raises(ConfigError) as e:
        MiniMaxConfig.from_dict(data)
    assert e.value.key == key
    assert repr(key) in str(e.value)


@pytest.mark.parametrize("model_type", ["minimax_m1", "minimax", "minimax_m2"])
@pytest.mark.parametrize(
    "key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
)
def test_a_missing_size_key_is_named_not_defaulted(model_type, key):
    """The reference code would fall back to some other model's size (hidden_size 4096 in the M1 dialects); mmx
    refuses, naming the key, in every dialect, and also when the key is present but null."""
    data = {**preset_dict("tiny-m1"), "model_type": model_type}
    data.pop("attn_type_list", None)
    for value in ("absent", None):
        if value == "absent":
            data.pop(key)
        else:
            data[key] = None
        with pytest.raises(ConfigError, match="is missing") as e:
            MiniMaxConfig.from_dict(data)
        assert e.value.key == key


def test_experts_count_is_required_under_either_name():
    data = {**preset_dict("tiny-m1")}
    experts = data.pop("num_local_experts")
    with pytest.raises(ConfigError) as e:
        MiniMaxConfig.from_dict(data)
    assert e.value.key == "num_local_experts"
    assert MiniMaxConfig.from_dict({**data, "num_experts": experts}).num_local_experts == experts


def test_unknown_keys_are_kept_or_rejected_when_strict(caplog):
    data = {**preset_dict("tiny-m1"), "num_hiden_layers": 3}
    with caplog.at_level(logging.WARNING, logger="mmx"):
        c = MiniMaxConfig.from_dict(data)
    assert c.extra == {"num_hiden_layers": 3} and "num_hiden_layers" in caplog.text
    assert c.to_dict()["num_hiden_layers"] == 3
    with pytest.raises(ConfigError) as e:
        MiniMaxConfig.from_dict(data, strict=True)
    assert e.value.key == "num_hiden_layers"


def test_replace_and_python_construction():
    c = MiniMaxConfig.from_preset("tiny-m1", num_hidden_layers=8)
    assert c.layer_types == [L, L, L, S] * 2
    with pytest.raises(ConfigError):
        c.replace(num_hiden_layers=2)
    with pytest.raises(TypeError):
        MiniMaxConfig(num_hiden_layers=2)  # a misspelt field is a TypeError naming it
    assert MiniMaxConfig() == MiniMaxConfig.from_preset("minimax-m1-80k").replace(dialect="transformers")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        MiniMaxConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        MiniMaxConfig.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)

"""Named architectures: the published MiniMax models, written as their own config.json files, and tiny ones.

The published presets are kept in each checkpoint's own dialect so that building them also exercises the
config reader on the exact keys the Hub files carry (specs/m1_architecture.md §1.1, specs/m2_and_formats.md §1.1).
"""

from __future__ import annotations

import copy
from typing import Any

from mmx.errors import ConfigError

_M1_80K: dict[str, Any] = {
    "architectures": ["MiniMaxM1ForCausalLM"],
    "attention_dropout": 0.0,
    "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1] * 10,
    "bos_token_id": None,
    "eos_token_id": None,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "layernorm_full_attention_alpha": 3.5565588200778455,
    "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": 3.5565588200778455,
    "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": 3.5565588200778455,
    "layernorm_mlp_beta": 1.0,
    "max_position_embeddings": 10240000,
    "model_type": "minimax_m1",
    "num_attention_heads": 64,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "postnorm": True,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000000,
    "rotary_dim": 64,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "shared_intermediate_size": 0,
    "shared_moe_mode": "sigmoid",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "transformers_version": "4.45.2",
    "use_cache": True,
    "vocab_size": 200064,
}

# The 40k checkpoint differs only in weights (its thinking budget); its head shows the Text-01 class names.
_M1_40K = {**_M1_80K, "architectures": ["MiniMaxText01ForCausalLM"]}
_TEXT_01 = {**_M1_80K, "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "minimax_text_01"}

_M2: dict[str, Any] = {
    "architectures": ["MiniMaxM2ForCausalLM"],
    "attention_dropout": 0.0,
    "attn_type_list": [1] * 62,
    "bos_token_id": 200034,
    "eos_token_id": 200020,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 196608,
    "model_type": "minimax_m2",
    "mtp_transformer_layers": 1,
    "num_attention_heads": 48,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 62,
    "num_key_value_heads": 8,
    "num_local_experts": 256,
    "num_mtp_modules": 3,
    "qk_norm_type": "per_layer",
    "rms_norm_eps": 1e-06,
    "rope_theta": 5000000,
    "rotary_dim": 64,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "scoring_func": "sigmoid",
    "shared_intermediate_size": 0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_mtp": True,
    "use_qk_norm": True,
    "use_routing_bias": True,
    "vocab_size": 200064,
}

# Small enough to train and run on a laptop CPU, with every architectural feature of its family.
_TINY_M1: dict[str, Any] = {
    **_M1_80K,
    "attn_type_list": [0, 0, 0, 1],
    "num_hidden_layers": 4,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rotary_dim": 16,
    "num_local_experts": 4,
    "vocab_size": 512,
    "max_position_embeddings": 65536,
    "layernorm_full_attention_alpha": 2.0,  # (2 N)^(1/4) with N = 4 layers, DeepNorm's rule as in M1
    "layernorm_linear_attention_alpha": 2.0,
    "layernorm_mlp_alpha": 2.0,
}
_TINY_M2: dict[str, Any] = {
    **_M2,
    "attn_type_list": [1, 1],
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rotary_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 512,
    "max_position_embeddings": 65536,
    "bos_token_id": None,
    "eos_token_id": None,
    "use_mtp": False,
    "num_mtp_modules": 0,
    "mtp_transformer_layers": 0,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    "minimax-m1-80k": _M1_80K,
    "minimax-m1-40k": _M1_40K,
    "minimax-text-01": _TEXT_01,
    "minimax-m2": _M2,
    "minimax-m2.1": _M2,
    "minimax-m2.5": _M2,
    "tiny-m1": _TINY_M1,
    "tiny-m2": _TINY_M2,
}


def preset_dict(name: str) -> dict[str, Any]:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])

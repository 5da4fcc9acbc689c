"""Checkpoints: official dialect vs transformers-native names, the float64 reference (partial RoPE, ALiBi slopes),
FP8 block dequantisation, shards, MTP tensors, bad checkpoints and the memory a load takes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmx
from mmx import CheckpointError, ConfigError, MiniMaxConfig, MiniMaxForCausalLM
from mmx.model.fp8 import quantize_fp8
from mmx.model.safetensors_io import SafetensorsError

from .conftest import assert_logits_close, tiny_model
from .reference import reference_cfg_from, reference_logits

L, S = "linear_attention", "full_attention"


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _official_m1(tmp_path, **overrides) -> tuple[MiniMaxForCausalLM, str]:
    """A tiny M1 written in the official remote-code dialect: attn_type_list, layernorm_*, w1 / w2 / w3 names."""
    model = tiny_model("tiny-m1", **overrides)
    path = str(tmp_path / "official")
    model.save_pretrained(path, dialect="official")
    return model, path


def test_official_dialect_files_look_official(tmp_path):
    _, path = _official_m1(tmp_path)
    config = read_json(os.path.join(path, "config.json"))
    assert config["model_type"] == "minimax_m1" and config["attn_type_list"] == [0, 0, 0, 1]
    assert "layer_types" not in config and config["layernorm_mlp_alpha"] == 2.0 and config["rotary_dim"] == 16
    keys = set(load_file(os.path.join(path, "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.3.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k or ".mlp." in k for k in keys)


def test_official_dialect_matches_transformers_native_dialect(tmp_path):
    """The same weights, once as an official checkpoint and once as a transformers-native one (config keys
    layer_types / *_factor / rope_parameters, fused gate_up_proj names), give the same model."""
    model, official_path = _official_m1(tmp_path, layer_types=[L, L, S, S])
    native_path = tmp_path / "native"
    native_path.mkdir()
    native_config = model.config.to_dict("transformers")
    native_config.pop("lightning_slopes")  # a plain transformers file: transformers' schedule
    (native_path / "config.json").write_text(json.dumps(native_config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, native_path / "model.safetensors")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(native_path / "model.safetensors"))

    official, native = mmx.load_model(official_path), mmx.load_model(native_path)
    assert official.config.dialect == "official" and native.config.dialect == "transformers"
    assert official.config.rotary_dim == native.config.rotary_dim == 16
    ids = torch.randint(0, 512, (2, 21))
    # Both lightning layers sit early, where the two slope schedules agree to ~1e-6 relative.
    assert_logits_close(native(ids), official(ids), rel=1e-5)
    assert_logits_close(official(ids), model(ids), rel=1e-6)


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny-m1", dict(layer_types=[L, S, L], rotary_dim=16, num_attention_heads=6, num_key_value_heads=3)),
        ("tiny-m1", dict(layer_types=[S, L], rotary_dim=8, block_size=4, num_experts_per_tok=3)),
        ("tiny-m2", dict(rotary_dim=16)),
    ],
)
def test_partial_rotary_and_alibi_against_float64_reference(preset, overrides, tmp_path):
    """transformers 5.23 ignores M1's rotary_dim, so the official semantics (RoPE on the first rotary_dim
    channels, ALiBi slopes for 6 heads) are checked against the independent float64 reference in reference.py."""
    model = tiny_model(preset, **overrides)
    assert model.config.rotary_dim < model.config.head_dim
    model.save_pretrained(tmp_path, dialect="official")
    loaded = mmx.load_model(tmp_path)
    weights = load_file(os.path.join(tmp_path, "model.safetensors"))
    ids = torch.randint(0, 512, (1, 13))
    expected = reference_logits(reference_cfg_from(loaded.config), weights, ids[0].tolist())
    assert_logits_close(loaded(ids)[0], expected, rel=1e-5)
    # Rotating every channel (transformers 5.23's reading) is measurably different from the reference.
    full = MiniMaxForCausalLM(loaded.config.replace(rotary_dim=loaded.config.head_dim))
    full.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        assert (full(ids)[0] - expected).abs().max() > 1e-3 * expected.abs().max()


def _fp8_checkpoint(tmp_path, block=(128, 128)):
    """A tiny M2 whose matrices are stored as float8_e4m3fn with per-block float32 scales, as M2 ships."""
    model = tiny_model("tiny-m2", hidden_size=256, intermediate_size=200, head_dim=80, rotary_dim=16)
    model.save_pretrained(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    config = read_json(os.path.join(tmp_path, "config.json"))
    quantized = {}
    for key, value in tensors.items():
        if key.endswith("proj.weight") or key.endswith(("w1.weight", "w2.weight", "w3.weight")):
            q, scale = quantize_fp8(value, block)
            quantized[key], quantized[key + "_scale_inv"] = q, scale
        else:
            quantized[key] = value
    config["dtype"] = "bfloat16"  # as the real M2 config says
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "float8_e4m3fn",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
    }
    save_file(quantized, os.path.join(tmp_path, "model.safetensors"))
    write_json(os.path.join(tmp_path, "config.json"), config)
    return model, quantized


def _dequantize_by_blocks(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def test_fp8_block_checkpoint_dequantises_on_load(tmp_path):
    original, stored = _fp8_checkpoint(tmp_path)
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (
        3,
        2,
    )  # 320 x 256 in 128-blocks, the last partial
    loaded = mmx.load_model(tmp_path, dtype=torch.float32)
    key = "model.layers.1.block_sparse_moe.experts.5.w2.weight"  # 256 x 200: a partial last block column
    expected = _dequantize_by_blocks(stored[key], stored[key + "_scale_inv"], (128, 128))
    torch.testing.assert_close(loaded.model.layers[1].mlp.experts.down_proj[5], expected, rtol=0, atol=0)
    q_key = "model.layers.0.self_attn.q_proj.weight"
    expected_q = _dequantize_by_blocks(stored[q_key], stored[q_key + "_scale_inv"], (128, 128))
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight, expected_q, rtol=0, atol=0)
    assert loaded.config.quantization_config is None  # the loaded weights are dense
    # End to end: the same logits as a dense checkpoint holding the block-by-block dequantised weights.
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    dense = {
        k: _dequantize_by_blocks(v, stored[k + "_scale_inv"], (128, 128)) if v.dtype == torch.float8_e4m3fn else v
        for k, v in stored.items()
        if not k.endswith("_scale_inv")
    }
    save_file(dense, dense_dir / "model.safetensors")
    original.config.save_pretrained(dense_dir)
    ids = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(loaded(ids), mmx.load_model(dense_dir)(ids), rtol=0, atol=0)
    bf16 = mmx.load_model(tmp_path)  # dtype from the config: bfloat16, router kept in float32
    assert bf16.dtype == torch.bfloat16 and bf16.model.layers[0].mlp.gate.weight.dtype == torch.float32


def test_fp8_weight_without_scale_is_reported(tmp_path):
    _, stored = _fp8_checkpoint(tmp_path)
    del stored["model.layers.0.self_attn.k_proj.weight_scale_inv"]
    save_file(stored, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj.weight is torch.float8_e4m3fn but has no .*weight_scale_inv"):
        mmx.load_model(tmp_path)


def test_mtp_tensors_are_skipped_with_a_log_line(tmp_path, caplog):
    model = tiny_model("tiny-m2")
    model.save_pretrained(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(4, 4)  # layer 2 of a 2-layer model: MTP
    tensors["model.layers.2.block_sparse_moe.gate.weight"] = torch.zeros(4, 4)
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="mmx"):
        loaded = mmx.load_model(tmp_path)
    assert "skipping 2 multi-token-prediction (MTP) tensors" in caplog.text
    ids = torch.randint(0, 512, (1, 5))
    torch.testing.assert_close(loaded(ids), model(ids))


def test_sharded_round_trip_and_resave_cleans_old_shards(tmp_path):
    model = tiny_model("tiny-m1")
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    index = read_json(tmp_path / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    loaded = mmx.load_model(tmp_path)
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    model.save_pretrained(tmp_path)  # one file now: the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(mmx.load_model(tmp_path)(ids), model(ids), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- bad input
def test_missing_shard_names_the_file(tmp_path):
    tiny_model("tiny-m1").save_pretrained(tmp_path, max_shard_size="300KB")
    shard = sorted(p for p in tmp_path.iterdir() if p.name.startswith("model-"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        mmx.load_model(tmp_path)


def _rewrite(tmp_path, edit):
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_wrong_shape_missing_and_unexpected_tensors_are_all_listed(tmp_path):
    tiny_model("tiny-m1").save_pretrained(tmp_path)

    def edit(t):
        t["model.layers.0.self_attn.out_proj.weight"] = torch.zeros(128, 64)
        del t["model.layers.3.self_attn.k_proj.weight"]
        del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
        t["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)

    _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        mmx.load_model(tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.out_proj.weight: checkpoint [128, 64], model expects [128, 128]" in msg
    assert "model.layers.3.self_attn.k_proj.weight" in msg and "2 missing tensors" in msg
    assert "model.layers.1.mlp.experts.gate_up_proj (1 expert slices, e.g. (2, 'up'))" in msg
    assert "1 unexpected tensors:\n  model.layers.0.self_attn.bogus.weight" in msg


def test_unknown_attn_type_is_a_config_error(tmp_path):
    tiny_model("tiny-m1").save_pretrained(tmp_path, dialect="official")
    config = read_json(tmp_path / "config.json")
    config["attn_type_list"] = [0, 0, 2, 1]
    write_json(tmp_path / "config.json", config)
    with pytest.raises(ConfigError, match=r"'attn_type_list': entry 2 is 2"):
        mmx.load_model(tmp_path)


def test_truncated_and_absent_files(tmp_path):
    tiny_model("tiny-m1").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors"):
        mmx.load_model(tmp_path)
    file.unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        mmx.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        mmx.load_model(tmp_path / "nowhere")


def test_load_peak_memory_stays_near_model_size(tmp_path):
    """Tensors stream into preallocated parameters: resident memory grows by about the model's size, not twice."""
    config = MiniMaxConfig.from_preset("tiny-m1", hidden_size=512, intermediate_size=1024, num_local_experts=8)
    model = MiniMaxForCausalLM(config).init_weights(seed=0)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    del model
    # VmHWM is this process's own high-water mark (ru_maxrss would inherit the parent's across fork + exec).
    script = textwrap.dedent(
        f"""
        import mmx
        import mmx.model.weights  # the code that loads, imported before the measurement starts (mmx is lazy)
        def status(field):
            line = next(l for l in open("/proc/self/status") if l.startswith(field))
            return int(line.split()[1]) * 1024
        before = status("VmRSS:")
        model = mmx.load_model({str(tmp_path)!r})
        print(status("VmHWM:") - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert model_bytes > 100e6
    assert growth < model_bytes + 64e6, f"load grew RSS by {growth / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"

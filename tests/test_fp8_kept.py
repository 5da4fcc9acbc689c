"""FP8 weights kept FP8 in memory (quantization="fp8"): against the same checkpoint dequantised on load (logits,
greedy tokens, both MoE paths), the bytes held, what the loader swaps and what it leaves, and the engine."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mmx import CheckpointError
from mmx.engine import LLMEngine, SamplingParams
from mmx.model.fp8 import dequantize_fp8
from mmx.model.fp8_linear import Fp8Experts, Fp8Linear
from mmx.model.generate import greedy_generate
from mmx.model.moe import GROUPED_MAX_PAIRS, Experts
from mmx.model.params import weight_bytes
from mmx.model.quantization import is_quantized, quantize_model
from mmx.model.weights import load_model

from .conftest import tiny_model
from .test_checkpoints import _fp8_checkpoint

BLOCK = (128, 128)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny M2 (hidden 256, intermediate 200, head_dim 80: partial last blocks) whose attention projections and
    expert w1 / w2 / w3 are float8_e4m3fn with float32 128 x 128 block scales, as M2 ships."""
    path = tmp_path_factory.mktemp("fp8")
    _, stored = _fp8_checkpoint(path, BLOCK)
    return str(path), stored


def _pair(path: str, dtype: torch.dtype):
    return load_model(path, dtype=dtype), load_model(path, dtype=dtype, quantization="fp8")


def test_loader_keeps_every_fp8_weight_in_fp8_modules(fp8_checkpoint):
    path, _ = fp8_checkpoint
    dense, kept = _pair(path, torch.bfloat16)
    for layer in kept.model.layers:
        attn = layer.self_attn
        assert all(isinstance(m, Fp8Linear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        assert isinstance(layer.mlp.experts, Fp8Experts)
        assert layer.mlp.gate.weight.dtype == torch.float32  # the router is not FP8 in the checkpoint
    assert kept.lm_head.weight.dtype == kept.model.embed_tokens.weight.dtype == torch.bfloat16
    assert is_quantized(kept) and not is_quantized(dense)
    assert kept.config.quantization_config["quant_method"] == "fp8"  # the weights in memory are still FP8
    assert quantize_model(kept, "fp8").layers == 0  # the engine's call after loading: nothing left to do
    assert kept.parameter_counts() == dense.parameter_counts()
    with pytest.raises(ValueError, match="save the model before quantising"):
        kept.save_pretrained(os.path.join(path, "resaved"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_greedy_tokens_equal_dequantised_on_load(fp8_checkpoint, dtype):
    """The kept path dequantises with the loader's own function (float32 product, one rounding to the activation
    dtype), so the weights it multiplies are the dense model's bit for bit: measured max |diff| 0.0 in float32 and
    in bf16, for a few tokens (grouped MoE path) and for 320 (per-expert loop). The tolerance (1e-6 of the logit
    scale, below one bf16 ulp) only leaves room for a BLAS that sums a freshly allocated matrix differently."""
    path, _ = fp8_checkpoint
    dense, kept = _pair(path, dtype)
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 7), (4, 80)]:  # 14 and 320 tokens: 28 and 640 (token, expert) pairs
        ids = torch.randint(0, dense.config.vocab_size, shape, generator=generator)
        with torch.no_grad():
            expected, got = dense(ids), kept(ids)
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7]])
    assert torch.equal(greedy_generate(kept, prompt, 12), greedy_generate(dense, prompt, 12))


@pytest.mark.parametrize("tokens", [5, GROUPED_MAX_PAIRS])  # 10 pairs: chosen experts only; 512: per-expert loop
def test_fp8_experts_match_dense_experts_on_both_paths(fp8_checkpoint, tokens):
    path, _ = fp8_checkpoint
    dense, kept = _pair(path, torch.float32)
    experts: Experts = dense.model.layers[1].mlp.experts
    fp8: Fp8Experts = kept.model.layers[1].mlp.experts
    generator = torch.Generator().manual_seed(1)
    k = dense.config.num_experts_per_tok
    x = torch.randn(tokens, dense.config.hidden_size, generator=generator)
    ids = torch.randint(0, experts.num_experts, (tokens, k), generator=generator)
    ids[:, 1] = (ids[:, 0] + 1) % experts.num_experts  # distinct experts per token, as top-k gives
    mix = torch.rand(tokens, k, generator=generator)
    with torch.no_grad():
        expected, got = experts(x, ids, mix), fp8(x, ids, mix)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_fp8_weights_take_one_byte_per_element_plus_their_scales(fp8_checkpoint, caplog):
    """Measured on this checkpoint: the whole model 12.87 MB (float32) / 6.44 MB (bf16) dequantised on load, 4.02 MB /
    3.50 MB with FP8 kept (the embedding and LM head, 0.52 MB each in float32, stay in the model dtype)."""
    path, stored = fp8_checkpoint
    with caplog.at_level(logging.INFO, logger="mmx.model.weights"):
        dense, kept = _pair(path, torch.bfloat16)
    assert "model weights in memory" in caplog.text
    fp8_keys = [k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn]
    fp8_bytes = sum(stored[k].numel() for k in fp8_keys)  # 1 byte an element
    scale_bytes = sum(stored[k + "_scale_inv"].numel() * 4 for k in fp8_keys)  # float32 per block
    modules = [m for m in kept.modules() if isinstance(m, Fp8Linear | Fp8Experts)]
    held = {id(b): b for m in modules for b in m.buffers()}.values()
    assert all(b.dtype in (torch.float8_e4m3fn, torch.float32) for b in held)
    assert sum(b.numel() * b.element_size() for b in held if b.dtype == torch.float8_e4m3fn) == fp8_bytes
    assert sum(b.numel() * b.element_size() for b in held if b.dtype == torch.float32) == scale_bytes
    # the rest of the model is the dense model's: the saving is exactly bf16 minus FP8-plus-scales
    assert weight_bytes(dense) - weight_bytes(kept) == 2 * fp8_bytes - (fp8_bytes + scale_bytes)
    assert weight_bytes(kept) < 0.6 * weight_bytes(dense)


def test_casting_moves_but_never_widens_the_fp8_storage(fp8_checkpoint):
    path, _ = fp8_checkpoint
    kept = load_model(path, dtype=torch.float32, quantization="fp8")
    kept.cast(torch.bfloat16)
    q_proj = kept.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.dtype == torch.float8_e4m3fn and q_proj.weight_scale_inv.dtype == torch.float32
    assert kept.model.embed_tokens.weight.dtype == torch.bfloat16
    experts = kept.model.layers[0].mlp.experts.to("meta")
    assert experts.down_qweight.device.type == "meta" and experts.down_qweight.dtype == torch.float8_e4m3fn


def test_a_block_only_partly_fp8_is_dequantised(fp8_checkpoint, tmp_path):
    """One expert slice stored dense: that layer's experts cannot be stacked in FP8, so they load dense; the rest
    stays FP8, and the logits are still the dequantised model's."""
    path, stored = fp8_checkpoint
    partial = dict(stored)
    key = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    partial[key] = dequantize_fp8(stored[key], partial.pop(key + "_scale_inv"), BLOCK, torch.float32)
    save_file(partial, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    kept = load_model(tmp_path, dtype=torch.float32, quantization="fp8")
    assert isinstance(kept.model.layers[0].mlp.experts, Fp8Experts)
    assert type(kept.model.layers[1].mlp.experts) is Experts
    assert isinstance(kept.model.layers[1].self_attn.q_proj, Fp8Linear)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), load_model(path, dtype=torch.float32)(ids), rtol=1e-6, atol=1e-6)


def test_a_checkpoint_without_fp8_weights_is_refused_naming_the_option(tmp_path):
    tiny_model("tiny-m2").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"keep_fp8 \(quantization='fp8'\).*holds no FP8 weights"):
        load_model(tmp_path, quantization="fp8")


def test_engine_generates_with_fp8_weights(fp8_checkpoint):
    path, _ = fp8_checkpoint
    dense, kept = _pair(path, torch.bfloat16)
    prompt = [3, 9, 4, 7, 1]
    expected = greedy_generate(dense, torch.tensor([prompt]), 8)[0].tolist()
    engine = LLMEngine(kept, quantization="fp8", max_model_len=64, cache_memory_gb=0.02)
    assert isinstance(engine.model.model.layers[0].mlp.experts, Fp8Experts)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        tokens = next((o.outputs[0].token_ids for o in engine.step() if o.finished), tokens)
    assert tokens == expected

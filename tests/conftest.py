"""Shared fixtures: seeds, and tiny random models whose weights are far enough from init to make logits
discriminating (random norms, larger init, non-zero routing bias)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors), so CI still checks them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Engines run eagerly unless a test asks for the compiled decode graph (compiling takes 10-30 s per model); run
# the suite with MMX_ENFORCE_EAGER=0 to compile everywhere.
os.environ.setdefault("MMX_ENFORCE_EAGER", "1")

from mmx import MiniMaxConfig, MiniMaxForCausalLM


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15, bias_scale: float = 0.0) -> torch.nn.Module:
    """Give every weight a random value: matrices N(0, std), norm weights 1 + N(0, 0.2), routing bias
    N(0, bias_scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(std * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_scale * torch.randn(b.shape, generator=gen))
    return model


def tiny_model(preset: str = "tiny-m1", seed: int = 0, **overrides) -> MiniMaxForCausalLM:
    config = MiniMaxConfig.from_preset(preset, **overrides)
    return randomize(MiniMaxForCausalLM(config), seed=seed, bias_scale=0.3 if config.use_routing_bias else 0.0).eval()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max |expected| (the tolerance is relative to the logit scale)."""
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} exceeds {rel:g} x logit scale {scale:.3e}"


# Text prompts for mmx-tiny (a trained model, so greedy choices are rarely near-ties).
MMX_TINY_PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: what is 12 * 7? Answer:",
    "Once upon a time, there was a little",
    "Nora has 3 cards. She buys 8 more. How many cards",
    "Sam had 15 shells and gave away 4.",
    "The weather in Paris is",
    "Let me check the calculator: 12 * 7 = 84.",
]


CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Lightning attention keeps a constant-size state per sequence. ",
    "MiniMax-M1 mixes lightning and softmax layers; MiniMax-M2 calls tools with XML. ",
    "Weather in Paris? It is 20 degrees. Let me check the calculator: 12 * 7 = 84. ",
    "naïve café — 東京 🙂 emoji and accents survive byte-level BPE. ",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE of 512 tokens with M2's special tokens and mmx's M2 chat template."""
    from mmx.chat import builtin_template, train_bpe_tokenizer
    from mmx.chat.tokenizer import M2_SPECIAL_TOKENS

    return train_bpe_tokenizer(
        CORPUS * 20,
        512,
        M2_SPECIAL_TOKENS,
        bos_token="]~!b[",
        eos_token="[e~[",
        chat_template=builtin_template("minimax_m2"),
    )


@pytest.fixture(scope="session")
def tiny_server():
    """A real `mmx serve` process of the embedded mmx-tiny model on 127.0.0.1 (skips when the model is absent)."""
    from mmx.embedded import embedded_model_path
    from tests.helpers import serve

    path = embedded_model_path()
    if path is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    with serve(path, max_model_len=2048, cache_gb=0.1) as url:
        yield url

"""The decode step in C (mmx.engine.native_step, mmx/ops/decode_rows.c): the same tokens and log-probs
as the eager engine on M2-style models (float32, a tied head and one K/V head, M1-style softmax layers with post-norm
and a softmax router) and as the compiled graph with int8 weights, through block tables that span many blocks and
share a prefix; the same bits on one thread as on two; and models it cannot take keep the compiled graphs."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from mmx.engine import LLMEngine, SamplingParams

from .conftest import tiny_model
from .test_decode_graph import SETTINGS as GRAPH_SETTINGS
from .test_decode_graph import _assert_same, _run, _traffic, needs_compiler

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the native step is C built on first use")

SETTINGS = dict(max_model_len=96, max_num_seqs=2, block_size=4)


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 30) -> list[tuple[list[int], list[float]]]:
    """Greedy generations with their log-probs, one request at a time (every decode step holds one sequence)."""
    out = []
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
        engine.add_request(f"r{i}", prompt, sampling)
        while engine.has_unfinished_requests():
            for result in engine.step():
                if result.finished:
                    sample = result.outputs[0]
                    out.append((sample.token_ids, [entry.logprob for entry in sample.logprobs]))
    return out


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    stem = torch.randint(0, vocab, (13,), generator=gen).tolist()
    return [stem + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (10, 1, 6)]  # a shared prefix


# MiniMax-M2's proportions: 6 query heads a K/V head, head size 128 with 64 rotary channels, top-8 of 16 experts
M2_SHAPED = dict(
    head_dim=128,
    rotary_dim=64,
    num_attention_heads=6,
    num_key_value_heads=1,
    num_local_experts=16,
    num_experts_per_tok=8,
)
ODD_HIDDEN = {"hidden_size": 48, "intermediate_size": 80}  # an odd number of 16s: a last down panel of 16
M1_STYLE = dict(layer_types=["full_attention"] * 2, num_hidden_layers=2, use_qk_norm=False, scoring_func="softmax")


@pytest.mark.parametrize(
    "preset, overrides, quantization",
    [
        ("tiny-m2", {}, None),
        pytest.param("tiny-m2", {}, "int8", marks=needs_compiler),
        pytest.param("tiny-m2", {}, "experts_int8", marks=needs_compiler),
        ("tiny-m2", {"tie_word_embeddings": True, "num_key_value_heads": 1}, None),
        ("tiny-m2", {"head_dim": 64, "rotary_dim": 32}, None),  # the kernel's copies for head sizes 64 and 128
        ("tiny-m2", ODD_HIDDEN, None),
        ("tiny-m2", M2_SHAPED, None),
        pytest.param("tiny-m2", M2_SHAPED, "int8", marks=needs_compiler),
        ("tiny-m1", M1_STYLE, None),  # post-norm residuals with alpha/beta, no QK-norm, softmax router
        ("tiny-m1", {}, None),  # the M1 hybrid: lightning layers' states in their slots, softmax layers' K/V
        pytest.param("tiny-m1", {}, "int8", marks=needs_compiler),
    ],
)
def test_native_steps_equal_eager(monkeypatch, preset, overrides, quantization):
    model = tiny_model(preset, **overrides)
    engine = LLMEngine(model, enforce_eager=False, quantization=quantization, **SETTINGS)
    native = engine.decode_graph.native
    assert native is not None
    if quantization:
        # eager int8 products round activations to bfloat16; the compiled graph's keep them in float32, as here
        monkeypatch.setenv("MMX_NATIVE_DECODE", "0")
        reference = LLMEngine(
            tiny_model(preset, **overrides), enforce_eager=False, quantization=quantization, **SETTINGS
        )
        assert reference.decode_graph.native is None
    else:
        reference = LLMEngine(tiny_model(preset, **overrides), enforce_eager=True, **SETTINGS)
    prompts = _prompts(model.config.vocab_size)
    expected, actual = _generate(reference, prompts), _generate(engine, prompts)
    assert native.steps == sum(len(tokens) - 1 for tokens, _ in actual)
    if not any(model.config.is_lightning(i) for i in range(model.config.num_hidden_layers)):
        assert engine.prefix_cache.stats.hit_tokens > 0  # later prompts' tables start with the first one's blocks
    for (tokens, logprobs), (got_tokens, got_logprobs) in zip(expected, actual):
        assert got_tokens == tokens
        assert max(abs(a - b) for a, b in zip(logprobs, got_logprobs)) < 2e-4


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny-m2", {}),
        ("tiny-m2", {"hidden_size": 48, "intermediate_size": 80}),
        ("tiny-m1", M1_STYLE),
        ("tiny-m1", {}),
    ],
)
def test_native_steps_of_many_sequences_equal_eager(preset, overrides):
    """Staggered traffic (one sequence, a few, more than FEW_ROWS; chunked prefill, a cache small enough to preempt):
    every decode step runs natively, with the same tokens and log-probs as the eager engine."""
    eager = LLMEngine(tiny_model(preset, **overrides), enforce_eager=True, **GRAPH_SETTINGS)
    native = LLMEngine(tiny_model(preset, **overrides), enforce_eager=False, **GRAPH_SETTINGS)
    traffic = _traffic(eager.config.vocab_size)
    expected, actual = _run(eager, traffic, {}), _run(native, traffic, {})
    graph = native.decode_graph
    assert graph.native is not None and graph.native.steps > 0 and not graph._seen  # no graph was needed
    _assert_same(expected, actual, 2e-4)


@pytest.mark.parametrize("quantization, overrides", [(None, {}), ("experts_int8", ODD_HIDDEN)])
def test_native_steps_read_weights_in_place_without_the_panel_copy(monkeypatch, quantization, overrides):
    """MMX_WEIGHT_PANELS=0 (as for weights too large to copy): the kernel reads the model's own layout, for
    one sequence and many, with the tokens and log-probs of the eager engine (float32) or of the native step over
    the panels (int8, whose eager products round differently); a value other than 0 or 1 is refused. The two sum in
    different orders (~1e-6 apart), which can flip a near-tie between two experts' router scores once in a while;
    such a step moves its sequence's log-probs by up to ~4e-4 (one in the 22 sequences of the int8 case)."""
    monkeypatch.setenv("MMX_WEIGHT_PANELS", "0")
    native = LLMEngine(
        tiny_model("tiny-m2", **overrides), enforce_eager=False, quantization=quantization, **GRAPH_SETTINGS
    )
    assert native.decode_graph.native is not None and native.decode_graph.native.panels is None
    monkeypatch.setenv("MMX_WEIGHT_PANELS", "1")
    reference = LLMEngine(
        tiny_model("tiny-m2", **overrides),
        enforce_eager=quantization is None,
        quantization=quantization,
        **GRAPH_SETTINGS,
    )
    if quantization:
        assert reference.decode_graph.native.panels is not None
    traffic = _traffic(native.config.vocab_size)
    expected, actual = _run(reference, traffic, {}), _run(native, traffic, {})
    _assert_same(expected, actual, 1e-3)
    gaps = sorted(max(abs(a - b) for a, b in zip(expected[k][1], actual[k][1])) for k in expected)
    assert gaps[len(gaps) * 9 // 10] < 1e-5
    assert native.decode_graph.native.steps > 0
    monkeypatch.setenv("MMX_WEIGHT_PANELS", "yes")
    with pytest.raises(ValueError, match="MMX_WEIGHT_PANELS='yes'"):
        LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, **GRAPH_SETTINGS)


def test_native_steps_read_weights_updated_in_place():
    """An RL weight sync copies new values into the engine's tensors: the next native steps compute with them. The
    panel copy follows in-place changes by the tensors' versions; changes through ``.data`` (which torch does not
    count) once reset_prefix_cache says the weights changed."""
    prompts = _prompts(512)
    engines = [LLMEngine(tiny_model("tiny-m2"), enforce_eager=eager, **SETTINGS) for eager in (True, False)]
    before = _generate(engines[1], prompts[2:])

    def same(expected, actual):
        assert actual[0][0] == expected[0][0]
        assert max(abs(a - b) for a, b in zip(expected[0][1], actual[0][1])) < 2e-4

    for engine in engines:
        with torch.no_grad():
            engine.model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
            engine.model.model.layers[1].mlp.experts.down_proj.add_(0.05)
            engine.model.lm_head.weight.mul_(-1.0)
    after = [_generate(engine, [[7, 8, 9, 10]]) for engine in engines]  # no cached prefix to go stale
    same(*after)
    for engine in engines:
        engine.model.model.layers[1].mlp.experts.gate_up_proj.data.mul_(2.0)
        engine.model.model.layers[0].self_attn.o_proj.weight.data.mul_(-1.0)
        engine.reset_prefix_cache()
    expected, actual = _generate(engines[0], prompts[2:]), _generate(engines[1], prompts[2:])
    assert actual[0][0] != before[0][0]
    same(expected, actual)


def test_native_step_refuses_a_table_without_the_position_block():
    """The C step reads positions through the block tables as it is given them: a sequence whose table does not
    reach the position it feeds is refused by name instead of being read past its end."""
    engine = LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, **SETTINGS)
    engine.add_request("r", list(range(1, 8)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()  # the prompt
    while engine.scheduler.running[0].num_computed_tokens % SETTINGS["block_size"]:
        engine.step()  # stop where the next token starts a block the scheduler has not grown yet
    seq = engine.scheduler.running[0]
    assert len(seq.block_table) * SETTINGS["block_size"] == seq.num_computed_tokens
    with pytest.raises(ValueError, match="no cache block for position"):
        engine.decode_graph.native([seq])


def test_native_steps_do_not_depend_on_the_thread_count():
    """Each output element is summed by one thread in a fixed order: one thread and two give the same bits."""
    runs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            engine = LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, quantization="int8", **SETTINGS)
            runs.append(_generate(engine, _prompts(engine.config.vocab_size)))
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "float16"])
def test_native_steps_with_half_precision_kv(kv_cache_dtype):
    """K/V stored in bfloat16 or float16: rounded as torch rounds them, read back exactly; as the eager engine. A
    key within float32 summation noise of a rounding boundary can round the other way in the two engines (one
    bfloat16 step is 2^-8), which moves the later log-probs of that sequence by ~1e-3: most steps agree to 1e-5."""
    settings = {**SETTINGS, "kv_cache_dtype": kv_cache_dtype}
    engine = LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, **settings)
    assert engine.decode_graph.native is not None
    reference = LLMEngine(tiny_model("tiny-m2"), enforce_eager=True, **settings)
    prompts = _prompts(engine.config.vocab_size)
    gaps = []
    for (tokens, logprobs), (got_tokens, got_logprobs) in zip(
        _generate(reference, prompts), _generate(engine, prompts)
    ):
        assert got_tokens == tokens
        gaps += [abs(a - b) for a, b in zip(logprobs, got_logprobs)]
    assert max(gaps) < 3e-3 and sorted(gaps)[len(gaps) // 2] < 1e-5


def test_native_steps_are_taken_only_where_they_apply(monkeypatch, caplog):
    """GELU experts, bfloat16 weights and MMX_NATIVE_DECODE=0 keep the compiled graphs, and the log says why."""
    with caplog.at_level(logging.INFO, logger="mmx.engine.native_step"):
        gelu = LLMEngine(tiny_model("tiny-m2", hidden_act="gelu"), enforce_eager=False, **SETTINGS)
        bf16 = LLMEngine(tiny_model("tiny-m2").cast(torch.bfloat16), enforce_eager=False, **SETTINGS)
    assert gelu.decode_graph.native is None and bf16.decode_graph.native is None
    assert "experts with 'gelu' (SiLU only)" in caplog.text
    assert "is not a contiguous float32 CPU tensor" in caplog.text
    monkeypatch.setenv("MMX_NATIVE_DECODE", "0")
    assert LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, **SETTINGS).decode_graph.native is None
    assert LLMEngine(tiny_model("tiny-m2"), enforce_eager=True, **SETTINGS).decode_graph is None

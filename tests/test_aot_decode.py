"""Decode graphs compiled ahead of time (mmx.engine.aot_decode): run without the compiler in the engine's process,
read the engine's own weights (in-place updates included, none baked into the code), are cached per model
structure, and fall back to torch.compile when they cannot be built. Token equality with the eager engine is in
tests/test_decode_graph.py (test_compiled_decode_equals_eager[aot-*]); these engines use the same settings, so
both share the libraries built once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmx import MiniMaxConfig, MiniMaxForCausalLM
from mmx.engine import LLMEngine
from mmx.engine.aot_decode import AotDecode, batch_kinds
from mmx.engine.args import EngineArgs
from mmx.engine.decode_step import decode_logits
from mmx.model.linear import FEW_ROWS

from .conftest import tiny_model
from .test_decode_graph import SETTINGS, needs_compiler


@pytest.fixture(autouse=True)
def _graphs_only(monkeypatch):
    """The graphs are tested here; the models' steps would otherwise run natively (tests/test_native_step.py)."""
    monkeypatch.setenv("MMX_NATIVE_DECODE", "0")


def _step_inputs(n: int, blocks: int) -> tuple[torch.Tensor, ...]:
    """A decode step of ``n`` sequences at distinct positions over random block tables (8 blocks wide)."""
    gen = torch.Generator().manual_seed(n)
    starts = torch.randint(3, 8 * 4 - 1, (n,), generator=gen)
    tables = torch.randint(1, blocks, (n, 8), generator=gen)
    write_at = tables.gather(1, (starts // 4)[:, None])[:, 0] * 4 + starts % 4
    ids = torch.randint(0, 100, (n,), generator=gen)
    return ids, starts, write_at, tables, starts + 1, torch.arange(n)


@needs_compiler
@pytest.mark.parametrize("preset", [pytest.param("tiny-m1", marks=pytest.mark.slow), "tiny-m2"])  # M1's: ~50 s to build
def test_aot_step_reads_the_engines_weights_in_place(preset):
    """Logits and cache writes of each kind of graph as the eager step's, over random cache contents, before and
    after the weights change in place (an RL weight sync): the library reads the engine's tensors, small ones
    included (a router's bias, decay rates: inductor would write those into the code)."""
    engine = LLMEngine(tiny_model(preset), enforce_eager=False, decode_compiler="aot", **SETTINGS)
    graph = engine.decode_graph
    graph._prepare_aot()
    assert graph._aot is not None, "the ahead-of-time graphs fell back"
    pools = graph._aot.pools
    gen = torch.Generator().manual_seed(0)
    for p in pools:
        p.copy_(torch.randn(p.shape, generator=gen))
    start = [p.clone() for p in pools]
    blocks = graph._keys[0].shape[0] if graph._keys else 2

    def both(n: int) -> float:
        args = _step_inputs(n, blocks)
        kind = "one" if n == 1 else "few" if n <= FEW_ROWS else "many"
        with torch.inference_mode():
            ours = graph._aot.run(kind, args)
            written = [p.clone() for p in pools]
            for p, s in zip(pools, start):
                p.copy_(s)
            reference = decode_logits(engine.model, graph.layer_index, *args, graph._keys, graph._values, graph._states)
        # float32 summation order: the gaps relative to the largest value (a wrong weight is off by O(1))
        pool_gap = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(written, pools))
        for p, s in zip(pools, start):
            p.copy_(s)
        return max(((ours - reference).abs().max() / (1 + reference.abs().max())).item(), pool_gap)

    for n in (1, 3, FEW_ROWS + 2):
        assert both(n) < 2e-5, n
    with torch.no_grad():
        for t in [*engine.model.parameters(), *engine.model.buffers()]:
            if t.is_floating_point() and t.dim() == 1:
                t.add_(0.25)  # norms, biases, rates: the 1-D tensors inductor would have inlined
            elif t.is_floating_point():
                t.mul_(1.5)
    for n in (1, 3, FEW_ROWS + 2):
        assert both(n) < 2e-5, n


@needs_compiler
def test_aot_engine_runs_without_the_compiler(tmp_path):
    """An engine whose graphs are built (or cached) ahead of time never imports dynamo or inductor: decoding one,
    a few and many sequences, through the MoE's custom op (which would import dynamo on its first call)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from tests.conftest import tiny_model
        from mmx.engine import LLMEngine, SamplingParams
        engine = LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, decode_compiler="aot", **{SETTINGS!r})
        engine.warm_up()
        for i in range(12):
            engine.add_request(str(i), list(range(3, 9 + i)), SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        graph = engine.decode_graph
        print(graph._aot is not None, sorted(graph._seen), "torch._dynamo" in sys.modules,
              "torch._inductor" in sys.modules)
        """
    )
    env = {**os.environ, "MMX_ENFORCE_EAGER": "0", "MMX_NATIVE_DECODE": "0"}  # the graphs, not the native step
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-6:] == ["True", "['few',", "'many',", "'one']", "False", "False"], done.stdout


def test_aot_falls_back_to_torch_compile(monkeypatch, caplog):
    engine = LLMEngine(tiny_model("tiny-m1"), max_model_len=64, enforce_eager=False, decode_compiler="aot")
    graph = engine.decode_graph
    assert graph.compiler == "aot" and graph._compiled is None  # nothing compiled in the process yet

    def broken(self):
        raise RuntimeError("ahead-of-time compilation failed (exit 1):\nno C++ compiler here")

    monkeypatch.setattr(AotDecode, "prepare", broken)
    graph._prepare_aot()
    assert graph.compiler == "inductor" and graph._aot is None and graph._compiled is not None
    assert "no C++ compiler here" in caplog.text and "compiling in this process instead" in caplog.text


def _aot_for(model: MiniMaxForCausalLM, **settings) -> AotDecode:
    engine = LLMEngine(model, enforce_eager=False, decode_compiler="aot", **{"max_model_len": 64, **settings})
    graph = engine.decode_graph
    return AotDecode(
        model,
        graph.layer_index,
        (graph._keys, graph._values, graph._states),
        engine.args.max_num_seqs,
        engine.max_model_len,
        engine.cache.block_size,
        8,
        "digest",
    )


def test_aot_cache_key_follows_what_the_code_is_built_from():
    """Same structure and settings: the same libraries. Another value the code would hold (the rotary base), other
    shapes, another batch range or dtype: others. Weight values: the same (they are not in the libraries)."""
    config = tiny_model("tiny-m2").config.to_dict()
    first = _aot_for(MiniMaxForCausalLM(MiniMaxConfig.from_dict(config)))
    again = MiniMaxForCausalLM(MiniMaxConfig.from_dict(config))
    with torch.no_grad():
        again.lm_head.weight.add_(1.0)
    assert _aot_for(again).folder == first.folder
    rope = {**config["rope_parameters"], "rope_theta": config["rope_parameters"]["rope_theta"] * 2}
    for change in ({"rope_parameters": rope}, {"num_local_experts": 4}):
        assert _aot_for(MiniMaxForCausalLM(MiniMaxConfig.from_dict({**config, **change}))).folder != first.folder
    assert _aot_for(MiniMaxForCausalLM(MiniMaxConfig.from_dict(config)), max_num_seqs=4).folder != first.folder
    other = MiniMaxForCausalLM(MiniMaxConfig.from_dict(config)).to(torch.bfloat16)
    assert _aot_for(other).folder != first.folder


def test_aot_memory_planning_only_when_asked(monkeypatch):
    """One allocation per step with MMX_AOT_MEMORY_PLANNING=1, in libraries of their own (not the default ones)."""
    config = tiny_model("tiny-m2").config.to_dict()
    monkeypatch.delenv("MMX_AOT_MEMORY_PLANNING", raising=False)
    default = _aot_for(MiniMaxForCausalLM(MiniMaxConfig.from_dict(config)))
    assert not default.spec.memory_planning
    monkeypatch.setenv("MMX_AOT_MEMORY_PLANNING", "1")
    planned = _aot_for(MiniMaxForCausalLM(MiniMaxConfig.from_dict(config)))
    assert planned.spec.memory_planning and planned.folder != default.folder


def test_batch_kinds_cover_every_batch():
    assert batch_kinds(1, 8) == {"one": (1, 1)}
    assert batch_kinds(8, 8) == {"one": (1, 1), "few": (2, 8)}
    assert batch_kinds(64, 8) == {"one": (1, 1), "few": (2, 8), "many": (9, 64)}


def test_decode_compiler_setting(monkeypatch):
    assert EngineArgs().decode_compiler == "auto"
    monkeypatch.setenv("MMX_DECODE_COMPILER", "inductor")
    assert EngineArgs().decode_compiler == "inductor"
    with pytest.raises(ValueError, match="decode_compiler must be one of auto, aot, inductor"):
        EngineArgs(decode_compiler="tvm")
    monkeypatch.delenv("MMX_DECODE_COMPILER")
    engine = LLMEngine(tiny_model("tiny-m1"), max_model_len=32, enforce_eager=False)
    assert engine.decode_graph.compiler == "aot"  # auto, on the CPU


def test_aot_falls_back_when_the_model_cannot_be_pickled(caplog):
    """The child gets the model's structure pickled; a model holding something unpicklable (a lock) is compiled in
    the process instead, with the reason logged."""
    import threading

    engine = LLMEngine(tiny_model("tiny-m1"), max_model_len=64, enforce_eager=False, decode_compiler="aot")
    engine.model.model.guard = threading.Lock()
    engine.decode_graph._prepare_aot()
    assert engine.decode_graph.compiler == "inductor"
    assert "compiling in this process instead" in caplog.text and "lock" in caplog.text
